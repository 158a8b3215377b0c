"""pass@k and majority vote on hand-made cases."""

import itertools

import pytest

from cftjax import grading, sample_scores


@pytest.mark.parametrize("n,c", [(4, 0), (4, 1), (5, 2), (6, 6)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_answer(n, c):
  answers = [True] * c + [False] * (n - c)
  for k in range(1, n + 1):
    subsets = list(itertools.combinations(answers, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert sample_scores.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_hand_values():
  assert sample_scores.pass_at_k(4, 1, 1) == 0.25
  assert sample_scores.pass_at_k(4, 1, 2) == 0.5  # naive 1-(3/4)^2 would be 0.4375
  assert sample_scores.pass_at_k(4, 3, 2) == 1.0
  with pytest.raises(ValueError):
    sample_scores.pass_at_k(4, 5, 1)


def test_majority_vote_groups_equivalent_answers():
  same = lambda a, b: grading.answers_match(a, b)
  # "0.5", "\\frac{1}{2}" and "1/2" are one answer (3 votes) against "3" (2); None never counts.
  assert sample_scores.majority_answer(["3", "0.5", "\\frac{1}{2}", None, None, "3", "1/2"], same) == "0.5"
  assert sample_scores.majority_answer(["7", "8", "8"], same) == "8"
  assert sample_scores.majority_answer([None, None, "8"], same) == "8"
  assert sample_scores.majority_answer([None], same) is None


def test_default_ks():
  assert sample_scores.default_ks(1) == [1]
  assert sample_scores.default_ks(8) == [1, 2, 4, 8]
  assert sample_scores.default_ks(6) == [1, 2, 4, 6]


def test_sampled_answer_rows_score_n_outputs_per_problem():
  from cftjax import evaluate

  examples = [{"answer": "4"}, {"answer": "10"}]
  outputs = [
      ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "no idea"],
      ["\\boxed{3}", "\\boxed{3}", "\\boxed{10}", "The answer is 3."],
  ]
  rows, summary = evaluate.sampled_answer_rows(examples, outputs)
  assert [r["correct"] for r in rows] == [[True, False, True, False], [False, False, True, False]]
  assert [r["majority"] for r in rows] == ["4", "3"]
  assert summary["accuracy"] == 3 / 8 and summary["samples"] == 4
  assert summary["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
  assert summary["pass@2"] == pytest.approx((sample_scores.pass_at_k(4, 2, 2) + sample_scores.pass_at_k(4, 1, 2)) / 2)
  assert summary["pass@4"] == 1.0 and summary["maj@4"] == 0.5
