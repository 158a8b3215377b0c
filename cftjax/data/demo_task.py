"""The embedded demo task: multi-step integer arithmetic with noisy solutions and critiques.

Everything is generated offline and deterministically from `DemoConfig.seed`, so the demo
runs anywhere (laptop CPU, no network) and every run sees the same data.

A problem is a start value and 3-5 operations (+, -, *) on small integers; every value,
right or wrong, stays in [0, 1000) so numbers tokenize in at most three digits.

  query:    "Start with 17. Add 5, then multiply by 3, then subtract 8. What is the result?"
  solution: "Step 1: 17 + 5 = 22\\nStep 2: 22 * 3 = 66\\nStep 3: 66 - 8 = 58\\nThe answer is 58."

A CFT record critiques a noisy response: with probability `error_fraction` the response holds
exactly one injected error (a wrong result, a misread operand or a miscopied previous value)
and later steps carry the wrong value forward with correct arithmetic, so its final answer is
wrong. The critique checks each step on its own: the critic's line for it, from the written
result before it by the question's operation, then the result as written and "ok"/"wrong"
("Step 2: 9 - 4 = 5, written 4: wrong."; a wrong step always has a wrong result); then it
names the first wrong step with its correct line, redoes the solution from there, states the
correct final answer and ends with "Conclusion: right" / "Conclusion: wrong". Like the teacher
critiques in the CFT paper, a fixed share (`flawed_critique_fraction`) of critiques reach the
wrong verdict; those records carry "critique_flawed": "1". `train_step_error_rate` gives
training responses several errors, so more of the checks the model learns from fail.

Splits never share a problem: each problem's canonical form is hashed into a fixed bucket
(90% train, 5% validation, 5% test), so a split's contents do not depend on the other
splits' sizes, and growing `num_train` leaves validation and test unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from cftjax import files, grading, objectives
from cftjax.data import records as records_lib
from cftjax.data.tokenizer import CHAT_MARKERS, SentencePieceTokenizer, train_sentencepiece

SPLITS = ("train", "validation", "test")
# Percent buckets [low, high) of the hashed problem space owned by each split.
_SPLIT_BUCKET_BOUNDS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}
MAX_VALUE = 1000  # the default bound: every value in a query, response or critique stays below it
# arithmetic: a result off by a slip; operand: the question's operand misread (by 1-2);
# carried: a step starts from the previous result miscopied (by a slip).
ERROR_KINDS = ("arithmetic", "operand", "carried")
_OPERAND_SLIPS = (-2, -1, 1, 2)
_PHRASES = {"+": "add", "-": "subtract", "*": "multiply by"}
_OPS_BY_PHRASE = {phrase: op for op, phrase in _PHRASES.items()}
# Bump when the generated text or file layout changes, so old caches are not reused.
DATA_FORMAT_VERSION = 17
DRILL_QUERY = "Practice: work out each line."
# cft and sft: views of each problem; drill and compare: practice of the skills a check needs.
RECORD_KINDS = ("cft", "sft", "drill", "compare")
# Every digit one piece, with its preceding space ("▁7") or without ("7" inside "17"): with a
# separate "▁" piece before each digit, the tokens that precede a number are all alike, and
# copying a number by what came before it (an induction head) has nothing to match on.
_DIGIT_PIECES = tuple(f"\u2581{digit}" for digit in range(10)) + tuple(str(digit) for digit in range(10))
TOKENIZER_SYMBOLS = ("\n", *CHAT_MARKERS, *_DIGIT_PIECES)
# The CFT paper's instruction; fed to tokenizer training so the prompt tokenizes compactly.


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """What the demo data is a function of. Equal configs give byte-identical files."""

  seed: int = 0
  num_train: int = 4000
  num_validation: int = 200
  num_test: int = 200
  min_steps: int = 3
  max_steps: int = 5
  error_fraction: float = 0.5
  # The train split's share of wrong responses when >= 0 (else error_fraction): more failing
  # checks to learn from, while validation and test keep error_fraction.
  train_error_fraction: float = -1.0
  # When > 0, a wrong train response has each step wrong with this probability (at least
  # one is) instead of exactly one error: the critique checks every step, so this sets how
  # many of the training checks fail.
  train_step_error_rate: float = 0.0
  flawed_critique_fraction: float = 0.2
  vocab_size: int = 512  # upper bound for the demo SentencePiece model
  # The task's difficulty: every value stays in [min_value, max_value) (min_value 10 and
  # max_value 100 write every number with two digits); start values in [max(2, min_value), max_start]; add/subtract operands in [1, max_add_operand]; multipliers in
  # [2, max_multiplier] (below 2: no multiplication); injected errors of these kinds, an
  # arithmetic error shifting a result by one of arithmetic_slips.
  min_value: int = 0
  max_value: int = MAX_VALUE
  max_start: int = 60
  max_add_operand: int = 30
  max_multiplier: int = 9
  error_kinds: tuple[str, ...] = ERROR_KINDS
  arithmetic_slips: tuple[int, ...] = (-10, -3, -2, -1, 1, 2, 3, 10)
  # Equations per arithmetic practice record (`drill_records`).
  drill_lines: int = 12
  # Check practice records (`compare_records`) per problem of a split.
  compare_per_problem: int = 4

  def __post_init__(self) -> None:
    for name in ("num_train", "num_validation", "num_test"):
      if getattr(self, name) < 0:
        raise ValueError(f"DemoConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not 1 <= self.min_steps <= self.max_steps:
      raise ValueError(
          f"DemoConfig needs 1 <= min_steps <= max_steps, got min_steps={self.min_steps}, "
          f"max_steps={self.max_steps}"
      )
    if self.train_error_fraction > 1.0:
      raise ValueError(
          f"DemoConfig.train_error_fraction must be <= 1 (< 0: error_fraction), got {self.train_error_fraction}"
      )
    for name in ("error_fraction", "flawed_critique_fraction", "train_step_error_rate"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"DemoConfig.{name} must be in [0, 1], got {getattr(self, name)}")
    if not max(2, self.min_value) <= self.max_start < self.max_value:
      raise ValueError(
          f"DemoConfig needs max(2, min_value) <= max_start < max_value, got min_value={self.min_value}, "
          f"max_start={self.max_start}, max_value={self.max_value}"
      )
    if self.compare_per_problem < 0:
      raise ValueError(f"DemoConfig.compare_per_problem must be >= 0, got {self.compare_per_problem}")
    if self.drill_lines < 1:
      raise ValueError(f"DemoConfig.drill_lines must be >= 1, got {self.drill_lines}")
    if self.max_add_operand < 1:
      raise ValueError(f"DemoConfig.max_add_operand must be >= 1, got {self.max_add_operand}")
    if not self.error_kinds or set(self.error_kinds) - set(ERROR_KINDS):
      raise ValueError(f"DemoConfig.error_kinds must be a non-empty subset of {ERROR_KINDS}, got {self.error_kinds}")
    if not self.arithmetic_slips or 0 in self.arithmetic_slips:
      raise ValueError(f"DemoConfig.arithmetic_slips must be non-empty and non-zero, got {self.arithmetic_slips}")
    if self.vocab_size < 300:
      raise ValueError(
          f"DemoConfig.vocab_size must be >= 300 (256 byte-fallback pieces plus specials), " f"got {self.vocab_size}"
      )

  def split_size(self, split: str) -> int:
    _check_split(split)
    return getattr(self, f"num_{split}")


@dataclasses.dataclass(frozen=True)
class Problem:
  start: int
  operations: tuple[tuple[str, int], ...]  # (op, operand) with op in "+", "-", "*"

  def canonical(self) -> str:
    """A unique text form, used to dedupe problems and to assign them to splits."""
    return " ".join([str(self.start), *(f"{op}{operand}" for op, operand in self.operations)])

  @functools.cached_property
  def values(self) -> tuple[int, ...]:
    """The start value followed by the correct value after each step."""
    values = [self.start]
    for op, operand in self.operations:
      values.append(_apply(op, values[-1], operand))
    return tuple(values)

  @functools.cached_property
  def solution(self) -> tuple[Step, ...]:
    """The correct solution, one `Step` per operation."""
    values = self.values
    return tuple(Step(values[i], op, operand, values[i + 1]) for i, (op, operand) in enumerate(self.operations))

  @property
  def answer(self) -> int:
    return self.values[-1]


@dataclasses.dataclass(frozen=True)
class Step:
  """One written solution line: `left op operand = result` (right or wrong)."""

  left: int
  op: str
  operand: int
  result: int

  def equation(self) -> str:
    return f"{self.left} {self.op} {self.operand} = {self.result}"


@dataclasses.dataclass(frozen=True)
class DemoData:
  """Where `prepare_demo_data` put the demo files, and whether this call built them."""

  directory: Path
  config: DemoConfig
  tokenizer_path: Path
  paths: Mapping[str, Mapping[str, Path]]  # record kind (RECORD_KINDS) -> split -> JSONL
  built: bool  # False when an existing cache was reused

  def records(self, split: str, kind: str = "cft") -> list[dict[str, str]]:
    """One split's records of one kind (`RECORD_KINDS`)."""
    _check_split(split)
    if kind not in self.paths:
      raise ValueError(f"demo record kind must be one of {RECORD_KINDS}, got {kind!r}")
    return read_jsonl(self.paths[kind][split])

  def tokenizer(self) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(self.tokenizer_path)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _apply(op: str, left: int, operand: int) -> int:
  if op == "+":
    return left + operand
  if op == "-":
    return left - operand
  if op == "*":
    return left * operand
  raise ValueError(f"unknown operation {op!r}")


def _in_range(value: int, config: DemoConfig) -> bool:
  return config.min_value <= value < config.max_value


# ---------------------------------------------------------------------------------------------
# Problems, solutions and noisy responses


def _uniform_int(rng: random.Random, low: int, high: int) -> int:
  """An int in [low, high]; `rng.random()` is several times faster than `randint`."""
  return low + int(rng.random() * (high - low + 1))


def _sample_operation(rng: random.Random, value: int, config: DemoConfig) -> tuple[str, int]:
  """An (op, operand) whose result from `value` stays in [min_value, max_value)."""
  top = config.max_value
  feasible = "+" if value + 1 < top else ""
  if value - 1 >= config.min_value:
    feasible += "-*" if value * 2 < top and config.max_multiplier >= 2 else "-"
  op = feasible[int(rng.random() * len(feasible))]
  if op == "+":
    return op, _uniform_int(rng, 1, min(config.max_add_operand, top - 1 - value))
  if op == "-":
    return op, _uniform_int(rng, 1, min(config.max_add_operand, value - config.min_value))
  return op, _uniform_int(rng, 2, min(config.max_multiplier, (top - 1) // value))


def _sample_problem(rng: random.Random, config: DemoConfig) -> Problem:
  value = _uniform_int(rng, max(2, config.min_value), config.max_start)
  start = value
  operations = []
  for _ in range(_uniform_int(rng, config.min_steps, config.max_steps)):
    op, operand = _sample_operation(rng, value, config)
    operations.append((op, operand))
    value = _apply(op, value, operand)
  return Problem(start, tuple(operations))


def _split_of(canonical: str) -> str:
  digest = hashlib.blake2b(canonical.encode("ascii"), digest_size=8).digest()
  bucket = int.from_bytes(digest, "big") % 100
  return next(split for split, (low, high) in _SPLIT_BUCKET_BOUNDS.items() if low <= bucket < high)


def query_text(problem: Problem) -> str:
  phrases = ", then ".join(f"{_PHRASES[op]} {operand}" for op, operand in problem.operations)
  return f"Start with {problem.start}. {phrases[0].upper()}{phrases[1:]}. What is the result?"


_QUERY_RE = re.compile(r"Start with (\d+)\. (.+)\. What is the result\?")
_OPERATION_RE = re.compile(r"(add|subtract|multiply by) (\d+)")


def parse_query(query: str) -> Problem:
  """Inverse of `query_text`; raises ValueError naming the query if it is not a demo query."""
  match = _QUERY_RE.fullmatch(query)
  if match is None:
    raise ValueError(f"not a demo arithmetic query: {query!r}")
  operations = []
  for phrase in match.group(2).split(", then "):
    op_match = _OPERATION_RE.fullmatch(phrase[:1].lower() + phrase[1:])
    if op_match is None:
      raise ValueError(f"unknown operation {phrase!r} in demo query {query!r}")
    operations.append((_OPS_BY_PHRASE[op_match.group(1)], int(op_match.group(2))))
  return Problem(int(match.group(1)), tuple(operations))


def response_text(steps: Sequence[Step]) -> str:
  lines = [f"Step {i}: {step.equation()}" for i, step in enumerate(steps, start=1)]
  lines.append(f"The answer is {steps[-1].result}.")
  return "\n".join(lines)


def _expected_step(problem: Problem, steps: Sequence[Step], index: int) -> Step:
  """Step `index` as it should read given what is written before it: it starts from the
  previous written result (the question's start for step 1) and applies the question's
  operation. Each step is judged on its own, so a response with several errors shows each."""
  left = problem.start if index == 0 else steps[index - 1].result
  op, operand = problem.operations[index]
  return Step(left, op, operand, _apply(op, left, operand))


def _propagate(problem: Problem, steps: list[Step], from_index: int, config: DemoConfig) -> list[Step] | None:
  """Recompute steps after `from_index` from the (wrong) value there; None if out of range."""
  for index in range(from_index + 1, len(problem.operations)):
    steps[index] = _expected_step(problem, steps, index)
    if not _in_range(steps[index].result, config):
      return None
  return steps


def _corrupt(rng: random.Random, step: Step, index: int, config: DemoConfig, kind: str | None = None) -> Step | None:
  """`step` with one error of `kind` (default: a random one), or None if the draw does not
  apply or leaves the value range."""
  kind = kind or rng.choice(config.error_kinds)
  if kind == "arithmetic":
    wrong = dataclasses.replace(step, result=step.result + rng.choice(config.arithmetic_slips))
  elif kind == "carried":
    left = step.left + rng.choice(config.arithmetic_slips)
    if index == 0 or not _in_range(left, config):
      return None
    wrong = dataclasses.replace(step, left=left, result=_apply(step.op, left, step.operand))
  else:
    operand = step.operand + rng.choice(_OPERAND_SLIPS)
    if operand < (2 if step.op == "*" else 1):
      return None
    wrong = dataclasses.replace(step, operand=operand, result=_apply(step.op, step.left, operand))
  return wrong if _in_range(wrong.result, config) else None


# Relative rates of the error kinds in a wrong training step. Misreads (a carried value or
# an operand) change the start of the line, slips only its result: a written result whose
# line starts as the critic's own does must be wrong often, or copying it pays off.
_TRAIN_KIND_RATES = {"carried": 0.3, "operand": 0.3, "arithmetic": 1.0}


def _corrupt_parts(rng: random.Random, step: Step, index: int, config: DemoConfig) -> Step:
  """`step` with each kind of error applied independently, arithmetic slips with probability
  `train_step_error_rate` and misreads less often (`_TRAIN_KIND_RATES`; at least one tried):
  training steps wrong in several parts at once, or only in their result."""
  kinds = [kind for kind in _TRAIN_KIND_RATES if kind in config.error_kinds]
  rate = config.train_step_error_rate
  chosen = [kind for kind in kinds if rng.random() < rate * _TRAIN_KIND_RATES[kind]] or [rng.choice(kinds)]
  for kind in chosen:
    step = _corrupt(rng, step, index, config, kind) or step
  return step


def _inject_error(rng: random.Random, problem: Problem, config: DemoConfig, max_tries: int = 1000) -> list[Step] | None:
  """The solution with one error at a random step, or None if no valid one was found.

  The error always changes the final answer and keeps every value in
  [config.min_value, config.max_value).
  """
  correct = list(problem.solution)
  for _ in range(max_tries):
    index = rng.randrange(len(correct))
    wrong = _corrupt(rng, correct[index], index, config)
    if wrong is None:
      continue
    steps = list(correct)
    steps[index] = wrong
    propagated = _propagate(problem, steps, index, config)
    if propagated is not None and propagated[-1].result != problem.answer:
      return propagated
  return None


def _results_reveal_errors(problem: Problem, steps: Sequence[Step]) -> bool:
  """Whether every step that does not follow from the written line before it also has a
  result that does not (errors that cancel out within a step are not drawn), so that
  checking each step's result finds every wrong step."""
  return all(
      step == expected or step.result != expected.result for step, expected in zip(steps, _own_lines(problem, steps))
  )


def _inject_errors(rng: random.Random, problem: Problem, config: DemoConfig, max_tries: int = 50) -> list[Step] | None:
  """A response whose steps are each wrong with probability `train_step_error_rate` (at
  least one is), every step continuing from the previous written result; None if no
  in-range one whose wrong steps all have wrong results was found."""
  for _ in range(max_tries):
    forced = rng.randrange(len(problem.operations))
    steps: list[Step] = []
    for index in range(len(problem.operations)):
      step = _expected_step(problem, steps, index)
      if not _in_range(step.result, config):
        break
      if index == forced or rng.random() < config.train_step_error_rate:
        step = _corrupt_parts(rng, step, index, config)
      steps.append(step)
    complete = len(steps) == len(problem.operations)
    if complete and steps[-1].result != problem.answer and _results_reveal_errors(problem, steps):
      return steps
  return None


# ---------------------------------------------------------------------------------------------
# Critiques


def _first_wrong_step(problem: Problem, steps: Sequence[Step]) -> int | None:
  """Index of the first step that differs from the correct solution, or None."""
  for index, (step, correct) in enumerate(zip(steps, problem.solution)):
    if step != correct:
      return index
  return None


_STEP_RE = re.compile(r"Step \d+: (\d+) ([-+*]) (\d+) = (\d+)")


def error_kind(query: str, response: str) -> str | None:
  """The kind of the first wrong step of a demo response ("arithmetic", "operand",
  "carried"), or None when every step is right. Raises ValueError naming a line it cannot read."""
  problem = parse_query(query)
  steps = []
  for line in response.split("\n")[: len(problem.operations)]:
    match = _STEP_RE.fullmatch(line)
    if match is None:
      raise ValueError(f"not a demo solution line: {line!r}")
    left, op, operand, result = match.groups()
    steps.append(Step(int(left), op, int(operand), int(result)))
  index = _first_wrong_step(problem, steps)
  if index is None:
    return None
  step = steps[index]
  if step.left != problem.values[index]:
    return "carried"
  return "operand" if step.operand != problem.operations[index][1] else "arithmetic"


def _check_line(number: int, step: Step, own: Step) -> str:
  """One step's check: the critic's own line for it, the written result, the verdict. A
  wrong step always has a wrong result (`_results_reveal_errors`), so the results decide."""
  verdict = "ok" if step.result == own.result else "wrong"
  return f"Step {number}: {own.equation()}, written {step.result}: {verdict}."


def _critique_lines(steps: Sequence[Step], own: Sequence[Step], chain: Sequence[Step]) -> str:
  """A critique of `steps`: each checked against the critic's own line for it (`own`), the
  first failing one named with that line, the critic's solution (`chain`) redone from there,
  its final answer, and the conclusion."""
  lines = [_check_line(number, step, line) for number, (step, line) in enumerate(zip(steps, own), start=1)]
  wrong = next((index for index, (step, line) in enumerate(zip(steps, own)) if step.result != line.result), None)
  if wrong is None:
    answer = steps[-1].result
  else:
    lines.append(f"The first wrong step is step {wrong + 1}; it should be {own[wrong].equation()}.")
    if wrong + 1 < len(chain):
      lines.append("Redone from there: " + ", ".join(step.equation() for step in chain[wrong + 1 :]) + ".")
    answer = chain[-1].result
  lines.append(f"The correct final answer is {answer}.")
  lines.append(f"Conclusion: {'right' if wrong is None else 'wrong'}")
  return "\n".join(lines)


def _own_lines(problem: Problem, steps: Sequence[Step]) -> list[Step]:
  """The critic's line for each step: from the previous written result (the question's start
  for step 1) by the question's operation. Each step is judged on its own."""
  return [_expected_step(problem, steps, index) for index in range(len(steps))]


def critique_text(problem: Problem, steps: Sequence[Step]) -> str:
  """A faithful critique: checks every step, names the first wrong one, gives the right answer."""
  return _critique_lines(steps, _own_lines(problem, steps), problem.solution)


def flawed_critique_text(rng: random.Random, problem: Problem, steps: Sequence[Step], config: DemoConfig) -> str:
  """A critique whose verdict is wrong, its checks consistent with that verdict.

  A wrong response is waved through (the critic's own lines are the written ones, its answer
  too); for a right response the critic miscomputes one step by a slip, rejects it there and
  redoes the rest from its own wrong value, claiming the answer that leads to.
  """
  if _first_wrong_step(problem, steps) is not None:
    return _critique_lines(steps, steps, steps)
  candidates = [(index, slip) for index in range(len(steps)) for slip in config.arithmetic_slips]
  rng.shuffle(candidates)
  for index, slip in candidates:
    claimed = dataclasses.replace(steps[index], result=steps[index].result + slip)
    if not _in_range(claimed.result, config):
      continue
    chain = _propagate(problem, [*steps[:index], claimed, *steps[index + 1 :]], index, config)
    if chain is not None:
      own = _own_lines(problem, steps)
      own[index] = claimed
      return _critique_lines(steps, own, chain)
  # unreachable for demo problems; say so loudly rather than emit odd values
  raise RuntimeError(f"demo data: no in-range flawed critique for {problem.canonical()!r}")


_FINAL_ANSWER_RE = re.compile(r"The (?:correct )?(?:final )?answer is\s*(-?\d+)", re.IGNORECASE)


def parse_conclusion(critique: str) -> str | None:
  """ "right"/"wrong" from the last "Conclusion: ..." in `critique`, or None if there is none."""
  return grading.parse_verdict(critique)


def extract_final_answer(text: str) -> str | None:
  """The integer in the last "The answer is N" / "The correct final answer is N", or None."""
  matches = _FINAL_ANSWER_RE.findall(text)
  return matches[-1] if matches else None


# ---------------------------------------------------------------------------------------------
# Splits and records


def _split_problems(config: DemoConfig, splits: Sequence[str]) -> dict[str, list[Problem]]:
  """Unique problems for each of `splits`, drawn from one stream shared by all splits.

  A problem goes to the split its hash bucket names, so the first n problems of a split
  are the same whatever the sizes of the other splits.
  """
  wanted = {split: config.split_size(split) for split in splits}
  problems: dict[str, list[Problem]] = {split: [] for split in splits}
  rng = random.Random(f"cftjax-demo:{config.seed}:problems")  # str seeds are hashed stably
  # Problems are not equally likely (an operation is drawn before its operand), so rare ones
  # in a small space need many more draws than there are problems.
  max_draws = 200_000 + 100 * sum(wanted.values())
  missing = sum(wanted.values())
  seen: set[str] = set()
  for _ in range(max_draws):
    if missing == 0:
      return problems
    problem = _sample_problem(rng, config)
    key = problem.canonical()
    split = _split_of(key)
    if split not in problems or len(problems[split]) >= wanted[split] or key in seen:
      continue
    seen.add(key)
    problems[split].append(problem)
    missing -= 1
  if missing == 0:
    return problems
  counts = ", ".join(f"{split} {len(problems[split])}/{wanted[split]}" for split in splits)
  raise ValueError(
      f"demo data: found too few unique problems in {max_draws} draws ({counts}) with "
      f"min_steps={config.min_steps}, max_steps={config.max_steps}; ask for fewer"
  )


def _split_records(config: DemoConfig, split: str, problems: Sequence[Problem]) -> list[dict[str, str]]:
  noise_rng = random.Random(f"cftjax-demo:{config.seed}:{split}:noise")
  use_train_share = split == "train" and config.train_error_fraction >= 0
  error_fraction = config.train_error_fraction if use_train_share else config.error_fraction
  critique_rng = random.Random(f"cftjax-demo:{config.seed}:{split}:critiques")
  num_flawed = round(config.flawed_critique_fraction * len(problems))
  order = list(range(len(problems)))
  critique_rng.shuffle(order)
  flawed = set(order[:num_flawed])
  records = []
  for index, problem in enumerate(problems):
    steps: Sequence[Step] = problem.solution
    is_right = noise_rng.random() >= error_fraction
    if not is_right:
      noisy = None
      if split == "train" and config.train_step_error_rate > 0:
        noisy = _inject_errors(noise_rng, problem, config)
      if noisy is None:  # also where the values' range leaves room for a single error only
        noisy = _inject_error(noise_rng, problem, config)
      if noisy is None:  # never seen in 100k problems; fail loudly rather than skew labels
        raise RuntimeError(f"demo data: could not inject an error into {problem.canonical()!r}")
      steps = noisy  # its final answer differs from the true one, so the label is "wrong"
    is_flawed = index in flawed
    critique = (
        flawed_critique_text(critique_rng, problem, steps, config) if is_flawed else critique_text(problem, steps)
    )
    records.append(
        {
            "objective": "cft",
            "query": query_text(problem),
            "response": response_text(steps),
            "critique": critique,
            "system": "",
            "history": "[]",
            "answer": str(problem.answer),
            "label": "right" if is_right else "wrong",
            "critique_flawed": "1" if is_flawed else "0",
        }
    )
  return records


def generate_splits(config: DemoConfig, splits: Sequence[str] = SPLITS) -> dict[str, list[dict[str, str]]]:
  """CFT records (canonical schema plus "critique_flawed": "1"/"0") of several splits at once."""
  for split in splits:
    _check_split(split)
  problems = _split_problems(config, splits)
  return {split: _split_records(config, split, problems[split]) for split in splits}


def generate_split(config: DemoConfig, split: str) -> list[dict[str, str]]:
  """CFT records of one split; the same records `generate_splits` gives for it."""
  return generate_splits(config, (split,))[split]


def sft_records(cft_records: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
  """SFT records (target = correct step-by-step solution) for the problems of CFT records."""
  records = []
  for index, cft in enumerate(cft_records):
    if cft.get("objective") != "cft":
      raise ValueError(f"sft_records: record {index} has objective {cft.get('objective')!r}, expected 'cft'")
    problem = parse_query(cft["query"])
    if cft.get("answer") not in ("", str(problem.answer)):
      raise ValueError(f"sft_records: record {index} has answer {cft['answer']!r} but its query gives {problem.answer}")
    records.append(
        {
            "objective": "sft",
            "query": cft["query"],
            "response": response_text(problem.solution),
            "critique": "",
            "system": cft.get("system", ""),
            "history": cft.get("history", "[]"),
            "answer": str(problem.answer),
            "label": "",
            "critique_flawed": "",
        }
    )
  return records


def _practice_record(query: str, response: str) -> dict[str, str]:
  """An SFT record of practice (no problem: no answer, label or critique)."""
  return {**records_lib.make_record(objective="sft", query=query, response=response), "critique_flawed": ""}


def drill_records(config: DemoConfig, split: str) -> list[dict[str, str]]:
  """Arithmetic practice, the demo's stand-in for a pretrained base's arithmetic.

  Each SFT record's query lists `drill_lines` numbered single operations drawn like a
  problem's steps ("3: 43 - 9"); the response works each out on its line ("3: 43 - 9 = 34").
  They teach the arithmetic a critique must redo to catch a wrong step. The random operands
  sit in the query, so every target token follows from the prompt: operands drawn in the
  target would be a loss no model can lower, whose gradient drowns the small signal of
  the skills the demo needs (a probe of the demo's model learns to compare two digits in
  ~150 steps with its loss on the verdicts, and not in 500 with the random digits trained
  too). The records hold equations, not problems, so the problem splits stay disjoint.
  """
  _check_split(split)
  rng = random.Random(f"cftjax-demo:{config.seed}:{split}:drill")
  records = []
  for _ in range(config.split_size(split)):
    steps = []
    for _ in range(config.drill_lines):
      left = _uniform_int(rng, max(2, config.min_value), config.max_value - 1)
      op, operand = _sample_operation(rng, left, config)
      steps.append(Step(left, op, operand, _apply(op, left, operand)))
    tasks = [f"{number}: {step.left} {step.op} {step.operand}" for number, step in enumerate(steps, start=1)]
    answers = [f"{number}: {step.equation()}" for number, step in enumerate(steps, start=1)]
    records.append(_practice_record("\n".join([DRILL_QUERY, *tasks]), "\n".join(answers)))
  return records


def compare_records(config: DemoConfig, split: str) -> list[dict[str, str]]:
  """Check practice, the demo's stand-in for a pretrained base that can check a line.

  Each SFT record gives one operation and a written result ("Check 9 - 4, written 4.") and
  answers with a check line as a critique writes it ("Check: 9 - 4 = 5, written 4: wrong."):
  the operation copied, its result worked out, the written result copied, the verdict. The
  random parts sit in the query, so every target token follows from the prompt. Half the
  written results are right, the others off by one of `arithmetic_slips`, as wrong steps are.
  A critique holds a few checks among many other tokens; the verdict comes from comparing two
  numbers, which the demo's model learns only from many clean comparisons in each step (a
  probe: ~150 steps with ~100 a step, not in 400 with 24). `compare_per_problem` records per
  problem of the split.
  """
  _check_split(split)
  rng = random.Random(f"cftjax-demo:{config.seed}:{split}:compare")
  records = []
  while len(records) < config.compare_per_problem * config.split_size(split):
    left = _uniform_int(rng, config.min_value, config.max_value - 1)
    op, operand = _sample_operation(rng, left, config)
    step = Step(left, op, operand, _apply(op, left, operand))
    written = step.result if rng.random() < 0.5 else step.result + rng.choice(config.arithmetic_slips)
    if not _in_range(written, config):
      continue
    verdict = "ok" if written == step.result else "wrong"
    records.append(
        _practice_record(
            f"Check {left} {op} {operand}, written {written}.",
            f"Check: {step.equation()}, written {written}: {verdict}.",
        )
    )
  return records


def demo_corpus_text(records: Iterable[Mapping[str, str]]) -> Iterator[str]:
  """Texts to train the demo tokenizer on: what the model will read and write.

  CFT records are laid out as in the CFT paper's prompt so its fixed words merge into few
  tokens; this only affects sequence length, never correctness (byte fallback covers all).
  """
  for record in records:
    if record["objective"] == "cft":
      yield objectives.cft_user_text(record["query"], record["response"])
      yield objectives.cft_target_text(record["critique"])
    else:
      yield record["query"]
      yield record["response"]


# ---------------------------------------------------------------------------------------------
# Files and cache


def write_jsonl(path: Path, records: Iterable[Mapping[str, str]]) -> None:
  files.write_text_atomically(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_jsonl(path: Path) -> list[dict[str, str]]:
  rows = []
  for _, row in records_lib.iter_jsonl_rows(path):
    if isinstance(row, records_lib.InvalidRow):
      raise row
    rows.append(row)
  return rows


def config_json(config: DemoConfig) -> dict:
  """The config as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _cache_key(config: DemoConfig) -> str:
  identity = {"format_version": DATA_FORMAT_VERSION, "config": dataclasses.asdict(config)}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def prepare_demo_data(data_dir: str | os.PathLike[str], config: DemoConfig) -> DemoData:
  """Generate the demo splits and train the demo tokenizer once; reuse them afterwards.

  Files go to `data_dir/demo-<hash of config>/`: `{split}.{kind}.jsonl` for each of
  `RECORD_KINDS`, `tokenizer.model` and, written last, `manifest.json`. A directory with a manifest and all
  its files is complete and is reused; a different config gets its own directory. Every file is
  written atomically, so concurrent hosts building the same config cannot leave a torn file.
  """
  if config.num_train == 0:
    raise ValueError("prepare_demo_data: num_train is 0, nothing to train the demo tokenizer on")
  key = _cache_key(config)
  directory = Path(data_dir) / f"demo-{key}"
  data = DemoData(
      directory=directory,
      config=config,
      tokenizer_path=directory / "tokenizer.model",
      paths={kind: {split: directory / f"{split}.{kind}.jsonl" for split in SPLITS} for kind in RECORD_KINDS},
      built=False,
  )
  manifest_path = directory / "manifest.json"
  outputs = [data.tokenizer_path, *(path for by_split in data.paths.values() for path in by_split.values())]
  if manifest_path.is_file() and all(path.is_file() for path in outputs):
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("config") == config_json(config):
      return data
    raise ValueError(f"{manifest_path} was written for another config (cache key {key} collides)")
  directory.mkdir(parents=True, exist_ok=True)
  train_text: list[str] = []
  for split, cft in generate_splits(config).items():
    by_kind = {
        "cft": cft,
        "sft": sft_records(cft),
        "drill": drill_records(config, split),
        "compare": compare_records(config, split),
    }
    for kind, records in by_kind.items():
      write_jsonl(data.paths[kind][split], records)
    if split == "train":
      train_text = [text for records in by_kind.values() for text in demo_corpus_text(records)]
  train_sentencepiece(train_text, directory / "tokenizer", config.vocab_size, user_defined_symbols=TOKENIZER_SYMBOLS)
  manifest = {
      "format_version": DATA_FORMAT_VERSION,
      "config": config_json(config),
      "files": sorted(path.name for path in outputs),
  }
  files.write_json_atomically(manifest_path, manifest)
  return dataclasses.replace(data, built=True)
