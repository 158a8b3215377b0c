import json

import pytest

from cftjax.eval_data import (
    MATH_SYSTEM_PROMPT,
    EvalExample,
    load_eval_file,
    math_messages,
    math_user_text,
)


def write_jsonl(path, rows):
  """Rows are dicts (dumped as JSON) or raw strings (written verbatim)."""
  lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_math_shapes_are_detected_per_row(tmp_path):
  path = write_jsonl(
      tmp_path / "mixed.jsonl",
      [
          {"question": "Janet has 3 ...?", "answer": "3 * 6 = 18\n#### 1,218"},
          {"problem": "What is 1/2 + 0?", "answer": "\\frac{1}{2}", "unique_id": "test/1.json"},
          {"problem": "Compute x.", "solution": "So $x = \\boxed{\\frac{\\sqrt{2}}{2}}$."},
          "",  # blank line: not a row
          {"prompt": "2 + 2 = ?", "answer": 4, "id": 7},
      ],
  )
  examples = load_eval_file(path, "math")
  assert examples == [
      EvalExample(id="mixed-1", question="Janet has 3 ...?", reference="1218", line=1),
      EvalExample(id="test/1.json", question="What is 1/2 + 0?", reference="\\frac{1}{2}", line=2),
      EvalExample(id="mixed-3", question="Compute x.", reference="\\frac{\\sqrt{2}}{2}", line=3),
      EvalExample(id="7", question="2 + 2 = ?", reference="4", line=5),
  ]


@pytest.mark.parametrize(
    "label, expected",
    [
        ("right", "right"),
        ("Wrong", "wrong"),
        ("true", "right"),
        (False, "wrong"),
        ("correct", "right"),
        ("incorrect", "wrong"),
        (1, "right"),
        ("0", "wrong"),
    ],
)
def test_critique_labels(tmp_path, label, expected):
  path = write_jsonl(tmp_path / "c.jsonl", [{"query": "Q", "response": "R", "label": label}])
  (example,) = load_eval_file(path, "critique")
  assert example.label == expected


def test_critique_row_shapes(tmp_path):
  path = write_jsonl(
      tmp_path / "crit.jsonl",
      [
          {"query": "Q1", "response": "R1", "label": "right", "answer": "5"},
          {"question": "Q2", "solution": "R2", "label": "wrong"},
          {"problem": "Q3", "response": "R3", "label": "wrong"},
      ],
  )
  examples = load_eval_file(path, "critique")
  assert [(e.question, e.response, e.label, e.reference) for e in examples] == [
      ("Q1", "R1", "right", "5"),
      ("Q2", "R2", "wrong", None),
      ("Q3", "R3", "wrong", None),
  ]


def test_json_list_file_keeps_line_numbers(tmp_path):
  path = tmp_path / "math500.json"
  path.write_text('[\n  {"problem": "P1", "answer": "1"},\n\n  {"problem": "P2",\n   "answer": "2"}\n]\n')
  examples = load_eval_file(path, "math")
  assert [(e.question, e.reference, e.line) for e in examples] == [("P1", "1", 2), ("P2", "2", 4)]


@pytest.mark.parametrize(
    "task, rows, line, reason",
    [
        ("math", [{"problem": "P", "answer": "1"}, '{"problem": "P2", "answer": '], 2, "malformed JSON"),
        ("math", [{"answer": "1"}], 1, "missing field"),
        ("math", [{"problem": "P"}], 1, "missing field 'answer'"),
        ("math", [{"problem": "P", "solution": "no box"}], 1, "no \\\\boxed"),
        ("math", [{"question": "Q", "answer": "work #### "}], 1, "nothing after"),
        ("math", [{"problem": "", "answer": "1"}], 1, "non-empty string"),
        ("math", [{"problem": "P", "answer": True}], 1, "string or number"),
        ("math", ["[1, 2]"], 1, "not an object"),
        ("math", [{"id": "a", "problem": "P", "answer": "1"}] * 2, 2, "duplicate id 'a'"),
        ("critique", [{"query": "Q", "response": "R", "label": "maybe"}], 1, "field 'label'"),
        ("critique", [{"query": "Q", "response": "R"}], 1, "missing field 'label'"),
        ("critique", [{"query": "Q", "label": "right"}], 1, "'response'"),
        ("critique", [{"query": "Q", "response": "R", "label": 2}], 1, "field 'label'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, task, rows, line, reason):
  path = write_jsonl(tmp_path / "bad_rows.jsonl", rows)
  with pytest.raises(ValueError, match=rf"bad_rows\.jsonl:{line}: .*{reason}"):
    load_eval_file(path, task)


@pytest.mark.parametrize(
    "content, line, reason",
    [
        ('{"problem": "P", "answer": "1"}', 1, "JSON list"),
        ('[\n {"problem": "P", "answer": "1"},\n {"problem": \n]', 4, "malformed JSON"),
        ('[\n {"problem": "P", "answer": "1"}\n {"problem": "Q", "answer": "2"}\n]', 3, "Expecting ',' delimiter"),
        ('[\n {"problem": "P"}\n]', 2, "missing field 'answer'"),
    ],
)
def test_bad_json_list_names_file_and_line(tmp_path, content, line, reason):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=rf"bad\.json:{line}: .*{reason}"):
    load_eval_file(path, "math")


def test_empty_file_and_unknown_task(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="empty.jsonl: no examples"):
    load_eval_file(empty, "math")
  with pytest.raises(ValueError, match="unknown eval task 'translation'"):
    load_eval_file(empty, "translation")


def test_math_prompt():
  assert MATH_SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."
  assert math_user_text("  What is 2+2?\n") == "What is 2+2?"
  assert math_messages("What is 2+2?") == [
      {"role": "system", "content": MATH_SYSTEM_PROMPT},
      {"role": "user", "content": "What is 2+2?"},
  ]
