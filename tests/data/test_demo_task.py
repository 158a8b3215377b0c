"""The embedded demo task, checked against an independent re-derivation of each problem."""

import dataclasses
import operator
import re
from typing import NamedTuple

import pytest

from cftjax.data import demo_task
from cftjax.data.demo_task import (
    SPLITS,
    DemoConfig,
    extract_final_answer,
    generate_split,
    generate_splits,
    parse_conclusion,
    prepare_demo_data,
    sft_records,
)

CONFIG = DemoConfig(seed=3, num_train=400, num_validation=120, num_test=130)
CANONICAL_KEYS = {"objective", "query", "response", "critique", "system", "history", "answer", "label"}
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PHRASE_OPS = {"add": "+", "subtract": "-", "multiply by": "*"}
STEP_RE = re.compile(r"Step (\d+): (\d+) ([-+*]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def splits():
  return generate_splits(CONFIG)


def _query_operations(query):
  """(start, [(op, operand), ...]) read from the query text, independently of demo_task."""
  match = re.fullmatch(r"Start with (\d+)\. (.+)\. What is the result\?", query)
  assert match, query
  operations = []
  for phrase in match.group(2).lower().split(", then "):
    name, operand = phrase.rsplit(" ", 1)
    operations.append((PHRASE_OPS[name], int(operand)))
  return int(match.group(1)), operations


def _true_values(query):
  start, operations = _query_operations(query)
  values = [start]
  for op, operand in operations:
    values.append(OPS[op](values[-1], operand))
  return values, operations


def _response_steps(response):
  lines = response.split("\n")
  steps = [STEP_RE.fullmatch(line) for line in lines[:-1]]
  assert all(steps), response
  assert [int(s.group(1)) for s in steps] == list(range(1, len(steps) + 1))
  parsed = [(int(s.group(2)), s.group(3), int(s.group(4)), int(s.group(5))) for s in steps]
  assert lines[-1] == f"The answer is {parsed[-1][3]}."
  return parsed


def _first_wrong_step(record):
  """Index of the first response step that deviates from the query, or None."""
  values, operations = _true_values(record["query"])
  for index, (left, op, operand, result) in enumerate(_response_steps(record["response"])):
    if (left, op, operand, result) != (values[index], *operations[index], values[index + 1]):
      return index
  return None


def test_records_follow_the_schema(splits):
  for records in splits.values():
    for record in records:
      assert set(record) == CANONICAL_KEYS | {"critique_flawed"}
      assert all(isinstance(value, str) for value in record.values())
      assert (record["objective"], record["system"], record["history"]) == ("cft", "", "[]")
      assert record["label"] in ("right", "wrong") and record["critique_flawed"] in ("0", "1")


def test_generation_is_deterministic_and_seeded(splits):
  assert generate_splits(CONFIG) == splits
  assert generate_split(CONFIG, "validation") == splits["validation"]
  other = generate_splits(dataclasses.replace(CONFIG, seed=4))
  assert {r["query"] for r in other["train"]} != {r["query"] for r in splits["train"]}


def test_splits_are_disjoint_and_stable_when_other_splits_grow(splits):
  queries = {split: [r["query"] for r in records] for split, records in splits.items()}
  for split in SPLITS:
    assert len(queries[split]) == CONFIG.split_size(split) == len(set(queries[split]))
  assert not set(queries["train"]) & set(queries["validation"])
  assert not set(queries["train"]) & set(queries["test"])
  assert not set(queries["validation"]) & set(queries["test"])
  bigger_train = dataclasses.replace(CONFIG, num_train=2 * CONFIG.num_train)
  assert generate_split(bigger_train, "test") == splits["test"]


def test_problems_respect_step_counts_and_value_range(splits):
  for records in splits.values():
    for record in records:
      values, operations = _true_values(record["query"])
      assert CONFIG.min_steps <= len(operations) <= CONFIG.max_steps
      assert record["answer"] == str(values[-1])
      for text in (record["query"], record["response"], record["critique"]):
        assert not re.search(r"-\d", text), text  # no negative numbers
        assert all(int(n) < demo_task.MAX_VALUE for n in re.findall(r"\d+", text)), text


def test_noisy_responses_carry_one_error_that_propagates_consistently(splits):
  kinds = set()
  for records in splits.values():
    for record in records:
      values, operations = _true_values(record["query"])
      steps = _response_steps(record["response"])
      wrong = _first_wrong_step(record)
      assert len(steps) == len(operations)
      if record["label"] == "right":
        assert wrong is None and steps[-1][3] == values[-1]
        assert demo_task.error_kind(record["query"], record["response"]) is None
        continue
      assert wrong is not None and steps[-1][3] != values[-1]  # the error changes the answer
      left, op, operand, result = steps[wrong]
      assert op == operations[wrong][0]
      if left != values[wrong]:  # miscopied from the previous (right) step
        kind = "carried"
        assert wrong > 0 and left != steps[wrong - 1][3] and operand == operations[wrong][1]
        assert result == OPS[op](left, operand)
      elif operand == operations[wrong][1]:
        kind = "arithmetic"
        assert result != OPS[op](left, operand)
      else:
        kind = "operand"
        assert result == OPS[op](left, operand)
      kinds.add(kind)
      assert demo_task.error_kind(record["query"], record["response"]) == kind
      previous = result
      for index in range(wrong + 1, len(steps)):  # later steps: right arithmetic, wrong input
        left, op, operand, result = steps[index]
        assert (left, op, operand) == (previous, *operations[index])
        assert result == OPS[op](left, operand)
        previous = result
  assert kinds == {"arithmetic", "operand", "carried"}


def test_error_fraction_controls_labels():
  all_right = generate_split(dataclasses.replace(CONFIG, error_fraction=0.0), "validation")
  all_wrong = generate_split(dataclasses.replace(CONFIG, error_fraction=1.0), "validation")
  assert {r["label"] for r in all_right} == {"right"}
  assert {r["label"] for r in all_wrong} == {"wrong"}
  assert all(_first_wrong_step(r) is not None for r in all_wrong)


def test_flawed_critique_share_matches_the_setting_exactly(splits):
  for split, records in splits.items():
    flawed = [r for r in records if r["critique_flawed"] == "1"]
    assert len(flawed) == round(CONFIG.flawed_critique_fraction * CONFIG.split_size(split))
    for record in records:
      verdict = parse_conclusion(record["critique"])
      assert record["critique"].split("\n")[-1] == f"Conclusion: {verdict}"
      assert (verdict == record["label"]) == (record["critique_flawed"] == "0")
  for fraction, expected in ((0.0, "0"), (1.0, "1")):
    records = generate_split(dataclasses.replace(CONFIG, flawed_critique_fraction=fraction), "test")
    assert {r["critique_flawed"] for r in records} == {expected}


CHECK_RE = re.compile(r"Step (\d+): (\d+) ([-+*]) (\d+) = (\d+), written (\d+): (ok|wrong)\.")


class Check(NamedTuple):
  own: tuple  # (left, op, operand, result): the critic's own line for the step
  written: int  # the response's result as the check quotes it
  verdict: str


def _equation(step):
  left, op, operand, result = step
  return f"{left} {op} {operand} = {result}"


def _checks(lines, steps):
  """The critique's check lines parsed, one per step, in order: each quotes the response's
  result exactly, and its verdict is re-derived from that and the critic's own result."""
  matches = [CHECK_RE.fullmatch(line) for line in lines[: len(steps)]]
  assert all(matches), lines
  checks = []
  for number, (match, step) in enumerate(zip(matches, steps), start=1):
    g = match.groups()
    assert int(g[0]) == number
    own, written = (int(g[1]), g[2], int(g[3]), int(g[4])), int(g[5])
    assert written == step[3]  # quoted from the response
    assert g[6] == ("ok" if own[3] == written else "wrong")
    checks.append(Check(own, written, g[6]))
  return checks


def _expected(values, operations, steps, index):
  """Step `index` as the written line before it and the question's operation make it."""
  left = values[0] if index == 0 else steps[index - 1][3]
  op, operand = operations[index]
  return (left, op, operand, OPS[op](left, operand))


def _chain(start_value, operations):
  """The solution lines from `start_value` through `operations`, recomputed here."""
  lines = []
  for op, operand in operations:
    lines.append((start_value, op, operand, OPS[op](start_value, operand)))
    start_value = lines[-1][3]
  return lines


def _tail(lines, checks, redo, answer):
  """After the checks: the first failing step named with the critic's line for it and the
  solution redone from there (when a step fails), the final answer, the conclusion."""
  wrong = next((i for i, check in enumerate(checks) if check.verdict == "wrong"), None)
  tail = []
  if wrong is not None:
    tail.append(f"The first wrong step is step {wrong + 1}; it should be {_equation(checks[wrong].own)}.")
    if redo:
      tail.append("Redone from there: " + ", ".join(map(_equation, redo)) + ".")
  tail += [f"The correct final answer is {answer}.", f"Conclusion: {'right' if wrong is None else 'wrong'}"]
  assert lines[len(checks) :] == tail
  return wrong


def test_faithful_critiques_check_each_step_against_the_line_before_it_and_name_the_first_wrong(splits):
  for records in splits.values():
    for record in records:
      if record["critique_flawed"] == "1":
        continue
      values, operations = _true_values(record["query"])
      lines = record["critique"].split("\n")
      steps = _response_steps(record["response"])
      checks = _checks(lines, steps)
      expected = [_expected(values, operations, steps, i) for i in range(len(steps))]
      assert [check.own for check in checks] == expected
      # results decide: a step is called wrong exactly when it does not follow from the line before it
      assert [check.verdict for check in checks] == ["ok" if s == e else "wrong" for s, e in zip(steps, expected)]
      first = _first_wrong_step(record)
      redo = [] if first is None else _chain(values[first + 1], operations[first + 1 :])
      assert _tail(lines, checks, redo, values[-1]) == first
      assert (first is None) == (record["label"] == "right")
      if first is not None:  # one error (CONFIG): the later steps follow from its value
        assert [check.verdict for check in checks].count("wrong") == 1


def test_flawed_critiques_are_consistent_with_their_wrong_verdict(splits):
  for records in splits.values():
    for record in (r for r in records if r["critique_flawed"] == "1"):
      lines = record["critique"].split("\n")
      steps = _response_steps(record["response"])
      checks = _checks(lines, steps)
      values, operations = _true_values(record["query"])
      if record["label"] == "wrong":  # waved through: the critic's lines are the written ones
        assert [check.own for check in checks] == steps and {check.verdict for check in checks} == {"ok"}
        _tail(lines, checks, [], steps[-1][3])
        continue
      # a right response rejected at one step the critic miscomputes; the rest redone from its value
      slipped = next(i for i, check in enumerate(checks) if check.verdict == "wrong")
      assert [check.verdict for check in checks].count("wrong") == 1
      own = checks[slipped].own
      assert own[:3] == steps[slipped][:3] and own[3] != steps[slipped][3]
      redo = _chain(own[3], operations[slipped + 1 :])
      claimed = redo[-1][3] if redo else own[3]
      _tail(lines, checks, redo, claimed)
      assert str(claimed) != record["answer"] == str(values[-1])


def test_train_step_errors_put_several_errors_in_train_responses_only():
  config = dataclasses.replace(EASY, train_error_fraction=0.8, train_step_error_rate=0.6)
  splits = generate_splits(config)
  baseline = generate_splits(dataclasses.replace(config, train_step_error_rate=0.0))
  assert splits["test"] == baseline["test"] and splits["validation"] == baseline["validation"]
  several = 0
  for record in splits["train"]:
    values, operations = _true_values(record["query"])
    steps = _response_steps(record["response"])
    if record["critique_flawed"] == "0":
      expected = [_expected(values, operations, steps, i) for i in range(len(steps))]
      checks = _checks(record["critique"].split("\n"), steps)
      assert [check.verdict for check in checks] == ["ok" if s == e else "wrong" for s, e in zip(steps, expected)]
    if record["label"] == "wrong":
      own_errors = [i for i in range(len(steps)) if steps[i] != _expected(values, operations, steps, i)]
      assert own_errors and steps[-1][3] != values[-1]
      several += len(own_errors) > 1
  assert several > 0.2 * len(splits["train"]), several
  with pytest.raises(ValueError, match="train_step_error_rate"):
    DemoConfig(train_step_error_rate=1.5)


def test_sft_records_hold_the_correct_solution(splits):
  cft = splits["validation"]
  sft = sft_records(cft)
  assert [r["query"] for r in sft] == [r["query"] for r in cft]
  for record in sft:
    assert set(record) == CANONICAL_KEYS | {"critique_flawed"}
    assert (record["objective"], record["critique"], record["label"]) == ("sft", "", "")
    assert _first_wrong_step(record) is None
    assert extract_final_answer(record["response"]) == record["answer"]
  with pytest.raises(ValueError, match="record 0 has objective 'sft'"):
    sft_records(sft)


def test_parse_conclusion_and_extract_final_answer():
  assert parse_conclusion("Step 1 is correct.\nConclusion: right") == "right"
  assert parse_conclusion("Conclusion: right\n...\nConclusion: **Wrong**.") == "wrong"
  assert parse_conclusion("no verdict here") is None
  assert extract_final_answer("Step 1: 2 + 3 = 5\nThe answer is 5.") == "5"
  assert extract_final_answer("The correct final answer is 58.\nConclusion: wrong") == "58"
  assert extract_final_answer("I think it is 7") is None


def test_config_and_split_errors_name_the_field():
  with pytest.raises(ValueError, match="min_steps=4, max_steps=3"):
    DemoConfig(min_steps=4, max_steps=3)
  with pytest.raises(ValueError, match="flawed_critique_fraction"):
    DemoConfig(flawed_critique_fraction=1.5)
  with pytest.raises(ValueError, match="num_test"):
    DemoConfig(num_test=-1)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    generate_split(CONFIG, "dev")
  with pytest.raises(ValueError, match="too few unique problems"):
    generate_split(DemoConfig(num_test=300, min_steps=1, max_steps=1), "test")  # 174 exist


def test_prepare_demo_data_builds_once_and_caches(tmp_path, monkeypatch, splits):
  trainings = []
  real_train = demo_task.train_sentencepiece

  def counting_train(*args, **kwargs):
    trainings.append(args)
    return real_train(*args, **kwargs)

  monkeypatch.setattr(demo_task, "train_sentencepiece", counting_train)
  data = prepare_demo_data(tmp_path, CONFIG)
  assert data.built and len(trainings) == 1
  for split in SPLITS:
    assert data.records(split, "cft") == splits[split]
    assert data.records(split, "sft") == sft_records(splits[split])
  tokenizer = data.tokenizer()
  critique = splits["train"][0]["critique"]
  assert tokenizer.decode(tokenizer.encode(critique)) == critique
  assert tokenizer.token_to_id("<|im_end|>") is not None
  model_mtime = data.tokenizer_path.stat().st_mtime_ns

  again = prepare_demo_data(tmp_path, CONFIG)
  assert not again.built and len(trainings) == 1
  assert again.directory == data.directory
  assert data.tokenizer_path.stat().st_mtime_ns == model_mtime

  other = prepare_demo_data(tmp_path, dataclasses.replace(CONFIG, seed=9))
  assert other.built and len(trainings) == 2 and other.directory != data.directory
  assert not list(tmp_path.rglob("*.tmp"))


def test_prepare_demo_data_rebuilds_an_incomplete_cache(tmp_path):
  data = prepare_demo_data(tmp_path, CONFIG)
  data.paths["cft"]["test"].unlink()
  again = prepare_demo_data(tmp_path, CONFIG)
  assert again.built
  assert again.records("test") == generate_split(CONFIG, "test")


EASY = dataclasses.replace(
    CONFIG,
    min_value=10,
    max_value=100,
    max_start=90,
    max_add_operand=9,
    max_multiplier=0,
    error_kinds=("arithmetic",),
    arithmetic_slips=(-2, -1, 1, 2),
    min_steps=2,
    max_steps=3,
)


def test_difficulty_knobs_bound_values_operations_and_errors():
  splits = generate_splits(EASY)
  slips = set()
  for records in splits.values():
    for record in records:
      values, operations = _true_values(record["query"])
      assert {op for op, _ in operations} <= {"+", "-"}
      assert all(1 <= operand <= 9 for _, operand in operations)
      assert all(10 <= value < 100 for value in values)
      for text in (record["response"], record["critique"]):  # every written value, right or wrong
        assert all(10 <= int(n) < 100 for n in re.findall(r"(?:= |answer is )(\d+)", text)), text
      steps = _response_steps(record["response"])
      assert all(10 <= value < 100 for step in steps for value in (step[0], step[3]))
      wrong = _first_wrong_step(record)
      if wrong is not None:
        left, op, operand, result = steps[wrong]
        assert operand == operations[wrong][1]  # arithmetic errors only
        slips.add(result - OPS[op](left, operand))
  assert slips == {-2, -1, 1, 2}


def test_difficulty_knob_errors_name_the_field():
  with pytest.raises(ValueError, match="min_value=50, max_start=20"):
    DemoConfig(min_value=50, max_start=20, max_value=100)
  with pytest.raises(ValueError, match="error_kinds"):
    DemoConfig(error_kinds=("typo",))
  with pytest.raises(ValueError, match="arithmetic_slips"):
    DemoConfig(arithmetic_slips=(0, 1))


def test_drill_records_work_out_the_operations_their_query_lists():
  drills = demo_task.drill_records(dataclasses.replace(EASY, drill_lines=7), "validation")
  assert len(drills) == EASY.num_validation
  assert drills == demo_task.drill_records(dataclasses.replace(EASY, drill_lines=7), "validation")
  assert drills != demo_task.drill_records(dataclasses.replace(EASY, drill_lines=7), "test")
  seen_ops = set()
  for record in drills:
    assert set(record) == CANONICAL_KEYS | {"critique_flawed"}
    assert (record["objective"], record["label"]) == ("sft", "")
    instruction, *tasks = record["query"].split("\n")
    lines = record["response"].split("\n")
    assert instruction == demo_task.DRILL_QUERY and len(tasks) == len(lines) == 7
    for number, (task, line) in enumerate(zip(tasks, lines), start=1):
      # every target token follows from the query: the line copies its task and adds the result
      assert line.startswith(task + " = ") and task.startswith(f"{number}: ")
      left, op, operand, result = re.fullmatch(r"\d+: (\d+) ([-+*]) (\d+) = (\d+)", line).groups()
      assert int(result) == OPS[op](int(left), int(operand))
      assert 1 <= int(operand) <= 9 and all(10 <= int(v) < 100 for v in (left, result))
      seen_ops.add(op)
  assert seen_ops == {"+", "-"}
  with pytest.raises(ValueError, match="drill_lines"):
    DemoConfig(drill_lines=0)


def test_demo_tokenizer_writes_each_digit_as_one_piece(tmp_path):
  tokenizer = prepare_demo_data(tmp_path, CONFIG).tokenizer()
  text = "Step 2 should be 17 - 9 = 8; written 17 - 9 = 6: wrong."
  pieces = [tokenizer.decode([token]) for token in tokenizer.encode(text)]
  assert "".join(pieces) == text
  assert [piece for piece in pieces if any(c.isdigit() for c in piece)] == [
      " 2",
      " 1",
      "7",
      " 9",
      " 8",
      " 1",
      "7",
      " 9",
      " 6",
  ]


def test_compare_records_check_the_line_their_query_gives_as_a_critique_does():
  config = dataclasses.replace(EASY, num_validation=100, compare_per_problem=3)
  records = demo_task.compare_records(config, "validation")
  assert len(records) == 300 and records == demo_task.compare_records(config, "validation")
  right = 0
  for record in records:
    assert set(record) == CANONICAL_KEYS | {"critique_flawed"} and record["objective"] == "sft"
    left, op, operand, written = re.fullmatch(r"Check (\d+) ([-+*]) (\d+), written (\d+)\.", record["query"]).groups()
    own = demo_task.Step(int(left), op, int(operand), OPS[op](int(left), int(operand)))
    assert int(written) == own.result or int(written) - own.result in config.arithmetic_slips
    assert all(config.min_value <= value < config.max_value for value in (own.left, own.result, int(written)))
    # a critique's check of a step written with this line and result, from "Step k" on
    check = demo_task._check_line(2, dataclasses.replace(own, result=int(written)), own)
    assert record["response"] == "Check" + check.removeprefix("Step 2")
    right += int(written) == own.result
  assert 110 <= right <= 190  # half the written results are right


def test_prepare_demo_data_writes_practice_beside_the_problems(tmp_path):
  data = prepare_demo_data(tmp_path, CONFIG)
  for split in SPLITS:
    assert data.records(split, "drill") == demo_task.drill_records(CONFIG, split)
    assert data.records(split, "compare") == demo_task.compare_records(CONFIG, split)
  with pytest.raises(ValueError, match="record kind"):
    data.records("train", "rl")


def test_error_kind_names_an_unreadable_line():
  with pytest.raises(ValueError, match="not a demo solution line: 'Step 1: twelve'"):
    demo_task.error_kind("Start with 12. Add 3. What is the result?", "Step 1: twelve\nThe answer is 15.")


def test_train_error_fraction_changes_only_the_train_split():
  config = dataclasses.replace(EASY, error_fraction=0.5, train_error_fraction=0.9)
  splits = generate_splits(config)
  baseline = generate_splits(dataclasses.replace(config, train_error_fraction=-1.0))
  assert splits["test"] == baseline["test"] and splits["validation"] == baseline["validation"]
  wrong_share = sum(r["label"] == "wrong" for r in splits["train"]) / len(splits["train"])
  assert 0.85 <= wrong_share <= 0.95, wrong_share
  with pytest.raises(ValueError, match="train_error_fraction"):
    DemoConfig(train_error_fraction=1.5)
