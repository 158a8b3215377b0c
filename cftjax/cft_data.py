"""Critique data made here: a student samples responses, the grader marks them, a teacher
critiques them, and each critique's verdict is checked against the grader.

    problems --student, N samples each--> responses --grading--> response_correct
             --teacher, CFT prompt------> critiques --parse_verdict--> critique_agrees

Everything sampled is appended to a ledger beside the output (`<out stem>.samples.jsonl`),
one line per finished problem, flushed and fsynced; a restarted run skips the problems the
ledger holds, so no problem is sampled or written twice. The selection (policy, right/wrong
balance, de-duplication) then runs over the whole ledger and rewrites the output and its
summary atomically: rerunning with another policy costs no generation at all.

The student and teacher are plain functions (`Sampler`, `Critic`), so tests and other
generators plug in through `make_cft_data`; `model_sampler` / `model_critic` wrap cftjax
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string
from pathlib import Path
from typing import Any, Callable, Sequence

from cftjax import eval_data, files, grading, objectives

POLICIES = ("all", "agreeing", "flawed_share")
LEDGER_SUFFIX = ".samples.jsonl"
SUMMARY_SUFFIX = ".summary.json"
TEACHER_PROMPT_FIELDS = ("question", "response", "reference")


@dataclasses.dataclass(frozen=True)
class Problem:
  index: int  # position in the problems file: the ledger's key
  id: str
  question: str
  reference: str


# (problems, samples per problem, seed) -> that many responses for each problem, in order.
Sampler = Callable[[Sequence[Problem], int, int], list[list[str]]]
# [(problem, response)] -> one critique text per pair, in order.
Critic = Callable[[Sequence[tuple[Problem, str]]], list[str]]


@dataclasses.dataclass(frozen=True)
class Selection:
  """How rows are chosen from the ledger; none of it changes what is generated."""

  policy: str = "all"
  flawed_share: float = 0.0  # share of flawed critiques among kept rows (policy flawed_share)
  right_ratio: float | None = None  # share of right responses among kept rows; None = as sampled
  dedupe: bool = False  # drop a response that repeats an earlier one of the same problem
  seed: int = 0  # which rows a subsampling keeps

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"--policy={self.policy!r} is not one of {POLICIES}")
    if not 0.0 <= self.flawed_share <= 1.0:
      raise ValueError(f"--flawed_share={self.flawed_share} must be in [0, 1]")
    if self.right_ratio is not None and not 0.0 <= self.right_ratio <= 1.0:
      raise ValueError(f"--right_ratio={self.right_ratio} must be in [0, 1]")


def load_problems(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
  """Problems in any math benchmark shape eval reads ({problem, answer}, GSM8K, ...)."""
  examples = eval_data.load_eval_file(path, "math")
  if limit is not None:
    examples = examples[:limit]
  return [Problem(i, e.id, e.question.strip(), e.reference) for i, e in enumerate(examples)]


def ledger_path(out: str | os.PathLike) -> Path:
  out = Path(out)
  return out.with_name(out.stem + LEDGER_SUFFIX)


def summary_path(out: str | os.PathLike) -> Path:
  out = Path(out)
  return out.with_name(out.stem + SUMMARY_SUFFIX)


# ------------------------------------------------------------------------------ prompts
def check_teacher_prompt(template: str) -> str:
  """A teacher prompt is the user turn with {question}, {response} and optionally {reference}."""
  fields = set()
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise ValueError(f"--teacher_prompt is not a valid format string: {e}") from None
  for _, field, _, _ in parsed:
    if field is not None:
      if field not in TEACHER_PROMPT_FIELDS:
        raise ValueError(
            f"--teacher_prompt has field {{{field}}}; allowed: " + ", ".join(f"{{{f}}}" for f in TEACHER_PROMPT_FIELDS)
        )
      fields.add(field)
  if "response" not in fields:
    raise ValueError("--teacher_prompt must contain {response}: the teacher has to see what it critiques")
  return template


def teacher_user_text(problem: Problem, response: str, template: str | None = None) -> str:
  """The CFT paper's critique request, or `template` filled in."""
  if template is None:
    return objectives.cft_user_text(problem.question, response)
  return template.format(question=problem.question, response=response, reference=problem.reference)


# ------------------------------------------------------------------------------ models
def chunk_seed(seed: int, first_problem: int) -> int:
  """Sampling seed of the batch that starts at `first_problem`: batches never share a stream."""
  return (int(seed) * 1_000_003 + int(first_problem)) % 2**32


def _generate_texts(loaded, prompts: list[list[int]], sampling, batch_size: int, progress: bool) -> list[str]:
  from cftjax import evaluate  # jax only when a model samples

  return evaluate.generate_texts(loaded, prompts, sampling, batch_size, progress)


def model_sampler(
    loaded,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    progress: bool = False,
) -> Sampler:
  """Student: the math evaluation prompt in the student's chat template, sampled.

  The N copies of a prompt sit next to each other in one generate call (equal lengths sort
  together), so they decode in the same batches; each copy draws its own key.
  """
  from cftjax import evaluate

  def sample(problems: Sequence[Problem], n: int, seed: int) -> list[list[str]]:
    prompt_of = [
        evaluate.answer_prompt(eval_data.math_user_text(p.question), loaded, eval_data.MATH_SYSTEM_PROMPT)
        for p in problems
    ]
    prompts = [prompt for prompt in prompt_of for _ in range(n)]
    sampling = evaluate.sampling_for(loaded, max_new_tokens, temperature, top_p, seed)
    texts = _generate_texts(loaded, prompts, sampling, max(batch_size, n), progress)
    return [texts[i * n : (i + 1) * n] for i in range(len(problems))]

  return sample


def model_critic(
    loaded,
    max_new_tokens: int,
    prompt_template: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> Critic:
  """Teacher: critiques in the CFT prompt format (or `prompt_template`) in its own chat template."""
  from cftjax import evaluate

  if prompt_template is not None:
    check_teacher_prompt(prompt_template)

  def critique(pairs: Sequence[tuple[Problem, str]]) -> list[str]:
    prompts = [evaluate.answer_prompt(teacher_user_text(p, r, prompt_template), loaded) for p, r in pairs]
    sampling = evaluate.sampling_for(loaded, max_new_tokens, temperature, top_p, seed)
    return _generate_texts(loaded, prompts, sampling, batch_size, progress)

  return critique


# ------------------------------------------------------------------------------ rows
def _dedupe_key(response: str) -> str:
  return re.sub(r"\s+", " ", response).strip()


def sample_problems(
    problems: Sequence[Problem], responses: Sequence[Sequence[str]], critic: Critic, samples: int
) -> list[dict]:
  """Ledger entries for `problems`: grade every response, critique each distinct one once."""
  entries = []
  pairs: list[tuple[Problem, str]] = []
  slots: list[list[dict]] = []  # rows waiting for pairs[k]'s critique
  for problem, texts in zip(problems, responses, strict=True):
    if len(texts) != samples:
      raise ValueError(f"the student returned {len(texts)} responses for problem {problem.id!r}, expected {samples}")
    rows, first_of = [], {}
    for j, text in enumerate(texts):
      response = text.strip()
      extracted = grading.extract_answer(response)
      row = {
          "sample": j,
          "response": response,
          "extracted_answer": extracted,
          "response_correct": bool(response) and grading.answers_match(extracted, problem.reference),
          "duplicate_of": None,
          "critique": "",
          "critique_verdict": None,
          "critique_agrees": False,
      }
      rows.append(row)
      if not response:
        continue
      key = _dedupe_key(response)
      if key in first_of:  # same text: the same critique (greedy) and no second teacher call
        row["duplicate_of"], pair = first_of[key]
        slots[pair].append(row)
        continue
      first_of[key] = (j, len(pairs))
      pairs.append((problem, response))
      slots.append([row])
    entries.append(
        {
            "problem": problem.index,
            "id": problem.id,
            "question": problem.question,
            "reference": problem.reference,
            "rows": rows,
        }
    )
  critiques = critic(pairs) if pairs else []
  if len(critiques) != len(pairs):
    raise ValueError(f"the teacher returned {len(critiques)} critiques for {len(pairs)} responses")
  for waiting, critique in zip(slots, critiques):
    critique = critique.strip()
    verdict = grading.parse_verdict(critique) if critique else None
    for row in waiting:
      expected = "right" if row["response_correct"] else "wrong"
      row.update(critique=critique, critique_verdict=verdict, critique_agrees=verdict == expected)
  return entries


def output_row(entry: dict, row: dict) -> dict:
  """A WebInstruct-CFT row ({instruction, input, output}) plus what was checked."""
  return {
      "instruction": objectives.CFT_INSTRUCTION,
      "input": objectives.cft_input_text(entry["question"], row["response"]),
      "output": row["critique"],
      "answer": entry["reference"],
      "problem_id": entry["id"],
      "sample": row["sample"],
      "extracted_answer": row["extracted_answer"],
      "response_correct": row["response_correct"],
      "critique_verdict": row["critique_verdict"],
      "critique_agrees": row["critique_agrees"],
  }


# ------------------------------------------------------------------------------ selection
def _take_share(a: list, b: list, share_a: float, rng: random.Random) -> tuple[list, list]:
  """The largest subsets of a and b in which a makes up `share_a` (to the nearest row)."""
  if share_a >= 1.0:
    return a, []
  if share_a <= 0.0:
    return [], b
  total = int(min(len(a) / share_a, len(b) / (1.0 - share_a)) + 1e-9)
  n_a = min(len(a), round(share_a * total))
  n_b = min(len(b), total - n_a)
  return rng.sample(a, n_a), rng.sample(b, n_b)


def _is_flawed(row: dict) -> bool:
  """A critique whose parsed verdict contradicts the grader (an unparseable one is no critique)."""
  return row["critique_verdict"] is not None and not row["critique_agrees"]


def select_rows(entries: Sequence[dict], selection: Selection) -> tuple[list[tuple[dict, dict]], dict]:
  """(entry, row) pairs to write, in ledger order, and the counts behind them."""
  rows = [(entry, row) for entry in entries for row in entry["rows"]]
  usable = [(e, r) for e, r in rows if r["response"] and r["critique"]]
  counts = {
      "empty_responses": sum(not r["response"] for _, r in rows),
      "empty_critiques": sum(bool(r["response"]) and not r["critique"] for _, r in rows),
  }
  if selection.dedupe:
    counts["duplicates_dropped"] = sum(r["duplicate_of"] is not None for _, r in usable)
    usable = [(e, r) for e, r in usable if r["duplicate_of"] is None]
  rng = random.Random(selection.seed)
  if selection.policy == "agreeing":
    kept = [(e, r) for e, r in usable if r["critique_agrees"]]
  elif selection.policy == "flawed_share":
    flawed = [(e, r) for e, r in usable if _is_flawed(r)]
    agreeing = [(e, r) for e, r in usable if r["critique_agrees"]]
    flawed, agreeing = _take_share(flawed, agreeing, selection.flawed_share, rng)
    kept = flawed + agreeing
  else:
    kept = usable
  if selection.right_ratio is not None:
    right, wrong = _take_share(
        [x for x in kept if x[1]["response_correct"]],
        [x for x in kept if not x[1]["response_correct"]],
        selection.right_ratio,
        rng,
    )
    kept = right + wrong
  chosen = {id(r) for _, r in kept}
  return [(e, r) for e, r in rows if id(r) in chosen], counts


def _share(numerator: int, denominator: int) -> float | None:
  return numerator / denominator if denominator else None


def summarize(
    entries: Sequence[dict], kept: Sequence[tuple[dict, dict]], counts: dict, selection: Selection, samples: int
) -> dict:
  rows = [r for e in entries for r in e["rows"]]
  critiqued = [r for r in rows if r["critique"]]
  right = [r for r in critiqued if r["response_correct"]]
  wrong = [r for r in critiqued if not r["response_correct"]]
  kept_rows = [r for _, r in kept]
  kept_right = sum(r["response_correct"] for r in kept_rows)
  kept_flawed = sum(_is_flawed(r) for r in kept_rows)
  return {
      "problems": len(entries),
      "samples_per_problem": samples,
      "rows_sampled": len(rows),
      "responses_right": sum(r["response_correct"] for r in rows),
      "responses_wrong": sum(not r["response_correct"] for r in rows),
      "response_right_share": _share(sum(r["response_correct"] for r in rows), len(rows)),
      "duplicates": sum(r["duplicate_of"] is not None for r in rows),
      **counts,
      "critiques": len(critiqued),
      "verdict_right": sum(r["critique_verdict"] == "right" for r in critiqued),
      "verdict_wrong": sum(r["critique_verdict"] == "wrong" for r in critiqued),
      "verdict_unparseable": sum(r["critique_verdict"] is None for r in critiqued),
      # Unparseable critiques count as disagreeing: they teach no verdict.
      "agreement_rate": _share(sum(r["critique_agrees"] for r in critiqued), len(critiqued)),
      "agreement_on_right_responses": _share(sum(r["critique_agrees"] for r in right), len(right)),
      "agreement_on_wrong_responses": _share(sum(r["critique_agrees"] for r in wrong), len(wrong)),
      "policy": selection.policy,
      "flawed_share_target": selection.flawed_share if selection.policy == "flawed_share" else None,
      "right_ratio_target": selection.right_ratio,
      "dedupe": selection.dedupe,
      "rows_kept": len(kept_rows),
      "kept_right": kept_right,
      "kept_wrong": len(kept_rows) - kept_right,
      "kept_right_share": _share(kept_right, len(kept_rows)),
      "kept_flawed": kept_flawed,
      "kept_flawed_share": _share(kept_flawed, len(kept_rows)),
      "kept_unparseable": sum(r["critique_verdict"] is None for r in kept_rows),
  }


# ------------------------------------------------------------------------------ ledger
def _fsync_append(f, line: str) -> None:
  f.write(line)
  f.flush()
  os.fsync(f.fileno())


def read_ledger(path: Path, settings: dict) -> dict[int, dict]:
  """Finished problems by index. A new ledger starts with `settings`; an old one must match
  them. A last line cut short by an interruption is removed (its problem is redone)."""
  data = path.read_bytes() if path.exists() else b""
  complete, _, torn = data.rpartition(b"\n")
  if not complete:  # new, or even the settings line was cut short
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
      _fsync_append(f, json.dumps({"settings": settings}) + "\n")
    return {}
  if torn:  # a write cut short: drop it, its problem will be sampled again
    with open(path, "r+b") as f:
      f.truncate(len(complete) + 1)
      os.fsync(f.fileno())
  entries: dict[int, dict] = {}
  for number, raw in enumerate(complete.split(b"\n"), 1):
    try:
      value = json.loads(raw)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); the ledger is damaged") from None
    if number == 1:
      old = value.get("settings") if isinstance(value, dict) else None
      if old is None:
        raise ValueError(f"{path}:1: no settings line: not a make_cft_data ledger")
      changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(
            f"{path} was made with other settings ({shown}); resume with the same ones, "
            f"or remove the ledger / pick another --out to start afresh"
        )
      continue
    if not isinstance(value, dict) or not isinstance(value.get("problem"), int) or "rows" not in value:
      raise ValueError(f"{path}:{number}: expected a problem entry with 'problem' and 'rows'")
    if value["problem"] in entries:
      raise ValueError(f"{path}:{number}: problem {value['problem']} appears twice")
    entries[value["problem"]] = value
  return entries


# ------------------------------------------------------------------------------ the run
def make_cft_data(
    problems: Sequence[Problem],
    sampler: Sampler,
    critic: Critic,
    out: str | os.PathLike,
    samples: int,
    selection: Selection = Selection(),
    settings: dict[str, Any] | None = None,
    seed: int = 0,
    problems_per_batch: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
  """Samples, grades and critiques every problem the ledger lacks, then writes the selected
  rows to `out` and the summary beside it. `settings` (what shapes generation: models,
  sampling, prompt) is stored in the ledger and checked on resume. Returns the summary."""
  if samples < 1:
    raise ValueError(f"--samples={samples} must be >= 1")
  if problems_per_batch < 1:
    raise ValueError(f"problems_per_batch={problems_per_batch} must be >= 1")
  out = Path(out)
  ledger = ledger_path(out)
  done = read_ledger(ledger, {**(settings or {}), "samples": samples, "seed": seed})
  for p in problems:  # the same path may hold other problems by now
    entry = done.get(p.index)
    if entry is not None and (entry["question"], entry["reference"]) != (p.question, p.reference):
      raise ValueError(
          f"{ledger}: problem {p.index} ({p.id!r}) differs from the problems file's; "
          "remove the ledger or pick another --out to start afresh"
      )
  if done:
    log(f"resuming: {len(done)} problems already in {ledger}")
  with open(ledger, "a") as f:
    # Fixed batch boundaries, so a batch's seed does not depend on where a run stopped.
    for start in range(0, len(problems), problems_per_batch):
      todo = [p for p in problems[start : start + problems_per_batch] if p.index not in done]
      if not todo:
        continue
      responses = sampler(todo, samples, chunk_seed(seed, problems[start].index))
      for entry in sample_problems(todo, responses, critic, samples):
        _fsync_append(f, json.dumps(entry) + "\n")
        done[entry["problem"]] = entry
      log(f"problems {sum(p.index in done for p in problems)}/{len(problems)}")
  entries = [done[p.index] for p in problems]
  kept, counts = select_rows(entries, selection)
  summary = summarize(entries, kept, counts, selection, samples)
  files.write_text_atomically(out, "".join(json.dumps(output_row(e, r)) + "\n" for e, r in kept))
  summary.update(output=str(out), ledger=str(ledger))
  files.write_text_atomically(summary_path(out), json.dumps(summary, indent=2) + "\n")
  return summary
