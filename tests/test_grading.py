import sys
import threading

import pytest

from cftjax.grading import (
    answers_match,
    critique_scores,
    extract_answer,
    extract_boxed,
    math_scores,
    normalize_answer,
    parse_gsm8k_reference,
    parse_verdict,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
        (r"first \boxed{3}, then \fbox{4}", "4"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not group delimiters
        (r"\boxed{7} and put it within \boxed{}", "7"),  # empty box skipped
        (r"\boxed{7} then \boxed{8", "7"),  # unclosed box skipped
        (r"\boxedx{3}", None),
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
  assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"... so \boxed{12}. The answer is 13.", "12"),  # boxed wins
        ("Adding them up, the answer is 42.", "42"),
        ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("So the answer is: **12**", "12"),
        ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
        ("Total\n#### 1,234", "1,234"),
        ("The temperature fell to -7 degrees", "-7"),
        ("5-3", "3"),  # subtraction, not -3
        ("we have 1,234,567 items.", "1,234,567"),
        ("The ratio is 3/4.", "3/4"),
        ("It costs $18.50 in total.", "18.50"),
        ("I am not sure how to solve this.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$18$", "18"),
        ("18 dollars", "18"),
        ("18 Dollars.", "18"),
        ("5\\text{ cm}", "5"),
        ("5 \\text{cm}^2", "5"),
        ("30^\\circ", "30"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("x = 2", "2"),
        ("\\$1,000", "1000"),
        ("18.0", "18"),
        ("42.", "42"),
        ("10\\%", "10"),
        ("\\text{(A)}", "(A)"),
        ("3m", "3m"),  # a bare single letter may be a variable: left alone
    ],
)
def test_normalize_answer(raw, expected):
  assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("\\dfrac{1}{2}", "1/2"),
        ("-3.0", "-3"),
        ("1,234", "1234"),
        ("18 dollars", "18"),
        ("5\\text{ cm}", "5"),
        ("x = 2", "2"),
    ],
)
def test_answers_match_without_symbolic_engine(predicted, reference, monkeypatch):
  # These must be decided by normalisation / exact numbers alone.
  monkeypatch.setitem(sys.modules, "math_verify", None)
  assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [("3", "4"), ("0.5", "\\frac{1}{3}"), ("-18", "18")])
def test_different_numbers_do_not_match(predicted, reference, monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)
  assert not answers_match(predicted, reference)


@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
        ("x=2", "2", True),
        ("2", "x=2", True),
        ("\\sqrt{12}", "2\\sqrt{3}", True),
        ("$\\pi$", "\\frac{2\\pi}{2}", True),
        ("\\{2, 1\\}", "\\{1,2\\}", True),
        ("\\sqrt{2}", "\\sqrt{3}", False),
        ("garbage{{", "\\pi", False),
    ],
)
def test_answers_match_symbolic(predicted, reference, expected):
  pytest.importorskip("math_verify")
  assert answers_match(predicted, reference) is expected


def test_output_without_answer_grades_wrong():
  assert answers_match(extract_answer("I give up."), "18") is False
  assert answers_match("", "0") is False


def test_symbolic_path_works_outside_main_thread():
  pytest.importorskip("math_verify")
  results = []
  worker = threading.Thread(target=lambda: results.append(answers_match("\\sqrt{12}", "2\\sqrt{3}")))
  worker.start()
  worker.join(timeout=60)
  assert results == [True]


def test_missing_math_verify_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)
  with pytest.raises(ImportError, match=r"cftjax\[eval\]"):
    answers_match("\\sqrt{12}", "2\\sqrt{3}")


def test_parse_gsm8k_reference():
  assert parse_gsm8k_reference("3 * 6 = <<3*6=18>>18\n#### 18") == "18"
  assert parse_gsm8k_reference("... #### 1,234") == "1234"
  assert parse_gsm8k_reference("#### -5") == "-5"
  with pytest.raises(ValueError, match="####"):
    parse_gsm8k_reference("no marker")
  with pytest.raises(ValueError, match="nothing after"):
    parse_gsm8k_reference("#### ")


@pytest.mark.parametrize(
    "critique, expected",
    [
        ("Step 2 is wrong.\nConclusion: wrong", "wrong"),
        ("Conclusion: right", "right"),
        ("conclusion:RIGHT", "right"),
        ("Conclusion: incorrect", "wrong"),
        ("Conclusion: **Correct**", "right"),
        ("Conclusion: right\nOn reflection...\nConclusion: wrong", "wrong"),  # last wins
        ("The verdict is \\boxed{right}", "right"),
        ("\\boxed{\\text{wrong}}", "wrong"),
        ("The solution looks wrong to me.", None),
        ("Conclusion: unsure", None),
    ],
)
def test_parse_verdict(critique, expected):
  assert parse_verdict(critique) == expected


def test_critique_scores_on_a_hand_computed_table():
  # label:  W  W  W  W  R  R  R  R
  # pred:   W  W  R  -  W  R  R  -
  # tp=2 (0,1) fn=2 (2,3) fp=1 (4) tn=2 (5,6) unparsed=2 (3,7)
  predicted = ["wrong", "wrong", "right", None, "wrong", "right", "right", None]
  labels = ["wrong"] * 4 + ["right"] * 4
  scores = critique_scores(predicted, labels)
  assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == (2, 1, 2, 2)
  assert scores["n"] == 8 and scores["unparsed"] == 2
  assert scores["accuracy"] == pytest.approx(4 / 8)
  assert scores["precision"] == pytest.approx(2 / 3)
  assert scores["recall"] == pytest.approx(2 / 4)
  assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
  assert scores["unparsed_rate"] == pytest.approx(2 / 8)


def test_critique_scores_undefined_ratios_are_zero():
  scores = critique_scores(["right", "right"], ["right", "right"])
  assert scores["accuracy"] == 1.0
  assert scores["precision"] == scores["recall"] == scores["f1"] == 0.0


@pytest.mark.parametrize(
    "predicted, labels, message",
    [
        (["right"], ["right", "wrong"], "1 verdicts but 2 labels"),
        ([], [], "no examples"),
        (["right"], ["correct"], r"labels\[0\]"),
        (["maybe"], ["right"], r"predicted_verdicts\[0\]"),
    ],
)
def test_critique_scores_rejects_bad_input(predicted, labels, message):
  with pytest.raises(ValueError, match=message):
    critique_scores(predicted, labels)


def test_math_scores():
  assert math_scores([True, False, True, True]) == {"accuracy": 0.75, "n": 4, "correct": 3}
  with pytest.raises(ValueError):
    math_scores([])
