"""Evaluation files (JSONL, or JSON holding a list) and the paper's math evaluation prompt.

Row shapes are detected per row:

- math:     GSM8K {question, answer: "... #### N"}; MATH-500 {problem, answer} or
            {problem, solution} (reference = last \\boxed{} of the solution);
            generic {prompt, answer}.
- critique: {query|question|problem, response|solution, label}, label one of
            right/wrong/true/false/correct/incorrect/1/0; an "answer" field is kept if present.

Any bad row raises ValueError("<file>:<line>: <reason>"); nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Literal

from cftjax.data import records
from cftjax.grading import extract_boxed, parse_gsm8k_reference

EvalTask = Literal["math", "critique"]
EVAL_TASKS: tuple[str, ...] = ("math", "critique")

# System prompt of the Qwen2.5-Math chain-of-thought evaluation used by the CFT paper.
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def math_user_text(question: str) -> str:
  """User turn for math evaluation: the question itself (the instruction is the system prompt)."""
  return question.strip()


def math_messages(question: str) -> list[dict[str, str]]:
  """Chat messages for math evaluation: the paper's system prompt, then the question."""
  return [
      {"role": "system", "content": MATH_SYSTEM_PROMPT},
      {"role": "user", "content": math_user_text(question)},
  ]


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """One evaluation item.

  reference is the final answer (None for a critique row without an "answer" field);
  response and label ("right"/"wrong") are set for critique rows only; line is the
  1-based line in the source file where the row starts.
  """

  id: str
  question: str
  reference: str | None
  line: int
  response: str | None = None
  label: str | None = None


_QUESTION_KEYS = ("problem", "question", "prompt", "query")
_CRITIQUE_QUESTION_KEYS = ("query", "question", "problem")
_CRITIQUE_RESPONSE_KEYS = ("response", "solution")
_LABELS = {
    "right": "right",
    "true": "right",
    "correct": "right",
    "1": "right",
    "wrong": "wrong",
    "false": "wrong",
    "incorrect": "wrong",
    "0": "wrong",
}


class _RowError(ValueError):
  """A problem with one row; load_eval_file adds the file and line."""


def _first_text_field(row: dict[str, Any], keys: tuple[str, ...]) -> str:
  """Value of the first key of keys present in row, which must be a non-empty string."""
  for key in keys:
    if key in row:
      value = row[key]
      if not isinstance(value, str) or not value.strip():
        raise _RowError(f"field {key!r} must be a non-empty string, got {value!r:.80}")
      return value
  raise _RowError(f"missing field: one of {', '.join(repr(k) for k in keys)}")


def _answer_text(value: Any) -> str:
  # JSON numbers are fine as answers ({"answer": 18}); booleans and objects are not.
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise _RowError(f"field 'answer' must be a string or number, got {value!r:.80}")
  text = str(value).strip()
  if not text:
    raise _RowError("field 'answer' is empty")
  return text


def _math_reference(row: dict[str, Any]) -> str:
  if "answer" in row:
    answer = _answer_text(row["answer"])
    if "####" in answer:  # a GSM8K worked solution ending in "#### N"
      try:
        return parse_gsm8k_reference(answer)
      except ValueError as error:
        raise _RowError(f"field 'answer': {error}") from None
    return answer
  if "solution" in row:
    solution = row["solution"]
    boxed = extract_boxed(solution) if isinstance(solution, str) else None
    if boxed is None:
      raise _RowError("no 'answer' field and field 'solution' has no \\boxed{} answer")
    return boxed
  raise _RowError("missing field 'answer' (or a 'solution' with a \\boxed{} answer)")


def _label(row: dict[str, Any]) -> str:
  if "label" not in row:
    raise _RowError("missing field 'label'")
  value = row["label"]
  key = str(value).strip().lower() if isinstance(value, (str, bool, int)) else None
  if key not in _LABELS:
    raise _RowError(f"field 'label' is {value!r:.80}; expected right/wrong, true/false, " "correct/incorrect or 1/0")
  return _LABELS[key]


def _row_id(row: dict[str, Any], default: str) -> str:
  for key in ("id", "unique_id"):
    if key in row:
      value = row[key]
      if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise _RowError(f"field {key!r} must be a non-empty string or integer")
      return str(value)
  return default


def _example_from_row(row: dict, task: str, line: int, default_id: str) -> EvalExample:
  example_id = _row_id(row, default_id)
  if task == "math":
    return EvalExample(
        id=example_id,
        question=_first_text_field(row, _QUESTION_KEYS),
        reference=_math_reference(row),
        line=line,
    )
  return EvalExample(
      id=example_id,
      question=_first_text_field(row, _CRITIQUE_QUESTION_KEYS),
      reference=_answer_text(row["answer"]) if "answer" in row else None,
      line=line,
      response=_first_text_field(row, _CRITIQUE_RESPONSE_KEYS),
      label=_label(row),
  )


def load_eval_file(path: str | Path, task: str) -> list[EvalExample]:
  """Examples of an evaluation file for task "math" or "critique".

  ``.json`` files hold one list of row objects; any other suffix is read as JSONL.
  Raises ValueError naming the file and line for a malformed row, an unknown task,
  duplicate ids, or a file without rows.
  """
  if task not in EVAL_TASKS:
    raise ValueError(f"unknown eval task {task!r}; expected one of {EVAL_TASKS}")
  path = Path(path)
  rows = records.iter_json_list_rows(path) if path.suffix == ".json" else records.iter_jsonl_rows(path)
  examples: list[EvalExample] = []
  first_line_of_id: dict[str, int] = {}
  for ref, row in rows:
    if isinstance(row, records.InvalidRow):
      raise row
    line = ref.line
    try:
      example = _example_from_row(row, task, line, default_id=f"{path.stem}-{line}")
    except _RowError as error:
      raise ValueError(f"{path}:{line}: {error}") from None
    if example.id in first_line_of_id:
      raise ValueError(
          f"{path}:{line}: duplicate id {example.id!r} " f"(first seen on line {first_line_of_id[example.id]})"
      )
    first_line_of_id[example.id] = line
    examples.append(example)
  if not examples:
    raise ValueError(f"{path}: no examples in file")
  return examples
