"""The experiment's stages in order: base data, base, arms; evaluation; table and plots.

Resumable: a training stage is finished when its final checkpoint exists (train.run
itself resumes an interrupted one from its newest checkpoint), an evaluation when its
result file exists (written atomically, with the settings it was made with). A stage
whose saved config differs from the one derived now fails rather than mixing results.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import ml_collections

from cftjax import files, train
from cftjax.data import sources
from cftjax.experiment import arms as arms_lib
from cftjax.experiment import base_data, evaluation, report


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  arm: str  # "base" or an arm name
  seed: int | None  # None for the base
  workdir: Path
  config: ml_collections.ConfigDict

  @property
  def label(self) -> str:
    return self.arm if self.seed is None else f"{self.arm} seed {self.seed}"

  @property
  def num_steps(self) -> int:
    return int(self.config.train.num_steps)

  def finished(self) -> bool:
    return (self.workdir / "checkpoints" / str(self.num_steps)).is_dir()


@dataclasses.dataclass(frozen=True)
class Plan:
  base: TrainingRun
  arms: tuple[TrainingRun, ...]
  base_data_dir: Path
  test_records: tuple[dict, ...]
  demo_config: object

  @property
  def runs(self) -> tuple[TrainingRun, ...]:
    return (self.base, *self.arms)


def make_plan(config: ml_collections.ConfigDict, workdir: str | Path) -> Plan:
  """Every stage's config, derived from the experiment config alone (prepares demo data)."""
  workdir = Path(workdir)
  recipe = config.recipe
  prepared = sources.prepare(recipe.data)
  tokenizer = str(prepared.tokenizer_path)
  num_test = int(config.evaluation.num_test)
  test_records = prepared.records("test", "cft")
  if not 1 <= num_test <= len(test_records):
    raise ValueError(
        f"config key evaluation.num_test={num_test} must be in [1, {len(test_records)}] " f"(recipe.data.demo.num_test)"
    )
  base_data_dir = workdir / "base_data"
  base = TrainingRun(
      "base",
      None,
      workdir / "base",
      arms_lib.base_config(recipe, tokenizer, base_data_dir, base_data.DATASET_NAME, int(config.base.num_steps)),
  )
  runs = []
  for arm in arms_lib.parse_arms(config.arms):
    for seed in arms_lib.parse_seeds(config.seeds):
      runs.append(
          TrainingRun(
              arm.name,
              seed,
              workdir / "arms" / f"{arm.name}-s{seed}",
              arms_lib.arm_config(recipe, arm, seed, base.workdir, tokenizer, int(config.arm_steps)),
          )
      )
  return Plan(base, tuple(runs), base_data_dir, tuple(test_records[:num_test]), sources.demo_config(recipe.data))


# ------------------------------------------------------------------------------ progress
class Progress:
  """Which stage is running, time so far, and an ETA from the stages timed in this process
  (training per step, evaluation per stage)."""

  def __init__(self, stages: Sequence[tuple[str, str, int]], stream=None):
    self.stages = list(stages)  # (kind, label, units): kind "train" (units = steps) | "eval" | "data"
    self.stream = stream or sys.stdout
    self.start_time = time.perf_counter()
    self.seconds = {"train": 0.0, "eval": 0.0, "data": 0.0}
    self.units = {"train": 0, "eval": 0, "data": 0}
    self.done = [False] * len(self.stages)

  def eta_seconds(self) -> tuple[float, bool]:
    """(seconds left for the timed kinds, whether some remaining kind is not timed yet)."""
    left, untimed = 0.0, False
    for (kind, _, units), done in zip(self.stages, self.done):
      if done:
        continue
      if self.units[kind]:
        left += units * self.seconds[kind] / self.units[kind]
      elif units:
        untimed = True
    return left, untimed

  def line(self, index: int, note: str = "") -> str:
    kind, label, units = self.stages[index]
    elapsed = (time.perf_counter() - self.start_time) / 60
    left, untimed = self.eta_seconds()
    eta = f"ETA {left / 60:.1f} min" + (" + stages not yet timed" if untimed else "")
    what = f"{kind} {label}" + (f" ({units} steps)" if kind == "train" else "")
    return f"[experiment {index + 1}/{len(self.stages)}] {what}{note} | {elapsed:.1f} min so far | {eta}"

  def run(self, index: int, work: Callable[[], bool]):
    """Runs one stage; `work` returns False when it found the stage finished and skipped it."""
    print(f"[{time.strftime('%H:%M:%S')}] " + self.line(index), file=self.stream, flush=True)
    started = time.perf_counter()
    did_work = work()
    kind, label, units = self.stages[index]
    self.done[index] = True
    if did_work:
      self.seconds[kind] += time.perf_counter() - started
      self.units[kind] += units
    else:
      print(f"[{time.strftime('%H:%M:%S')}]   {kind} {label}: already finished, skipped", file=self.stream, flush=True)


# ------------------------------------------------------------------------------ stages
def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def check_saved_config(run: TrainingRun) -> None:
  """A workdir trained under another config must not be resumed or reused silently."""
  saved_path = run.workdir / "config.json"
  if not saved_path.is_file():
    return
  saved = ml_collections.ConfigDict(json.loads(saved_path.read_text()))
  changed = arms_lib.differing_keys(saved, ml_collections.ConfigDict(_config_json(run.config)))
  if changed:
    raise ValueError(
        f"{run.workdir} was trained with another config (differs in {', '.join(sorted(changed))}); "
        f"delete that directory or choose another --workdir"
    )


def train_stage(run: TrainingRun, devices) -> bool:
  check_saved_config(run)
  if run.finished():
    return False
  result = train.run(run.config, run.workdir, devices)
  if result.final_step != run.num_steps:
    raise RuntimeError(
        f"{run.label}: training stopped at step {result.final_step} of {run.num_steps} "
        f"({result.stopped_early or 'unknown reason'}); arms need equal budgets: give it more data "
        f"(recipe.data.demo.num_train, base.num_problems) or fewer steps"
    )
  return True


def training_summary(run: TrainingRun) -> dict:
  """Steps, token slots, supervised tokens and final loss, from the run's metrics.jsonl."""
  target_tokens, step_seconds, final_loss = 0.0, 0.0, None
  for line in (run.workdir / "metrics.jsonl").read_text().splitlines():
    entry = json.loads(line)
    if "loss" in entry and entry["step"] <= run.num_steps:
      target_tokens += entry.get("tokens_cft", 0.0) + entry.get("tokens_sft", 0.0)
      step_seconds += entry.get("step_time", 0.0)
      final_loss = entry["loss"]
  return {
      "steps": run.num_steps,
      "token_budget": arms_lib.token_budget(run.config),
      "target_tokens": target_tokens,
      "final_loss": final_loss,
      "mixture": run.config.data.mixture,
      "step_seconds": step_seconds,
  }


def eval_settings(config: ml_collections.ConfigDict, run: TrainingRun) -> dict:
  e = config.evaluation
  return {
      "num_test": int(e.num_test),
      "answer_max_new_tokens": int(e.answer_max_new_tokens),
      "critique_max_new_tokens": int(e.critique_max_new_tokens),
      "checkpoint_step": run.num_steps,
  }


def eval_stage(config, run: TrainingRun, test_records, devices) -> bool:
  result_path = run.workdir / "eval.json"
  settings = eval_settings(config, run)
  if result_path.is_file() and json.loads(result_path.read_text()).get("settings") == settings:
    return False
  started = time.perf_counter()
  rows, summary = evaluation.evaluate_checkpoint(
      run.workdir,
      test_records,
      settings["answer_max_new_tokens"],
      settings["critique_max_new_tokens"],
      int(config.evaluation.batch_size),
      progress=sys.stderr.isatty(),
      devices=devices,
  )
  files.write_json_atomically(run.workdir / "eval_rows.json", rows)
  files.write_json_atomically(
      result_path,
      {
          "arm": run.arm,
          "seed": run.seed,
          "settings": settings,
          "summary": summary,
          "train": training_summary(run),
          "eval_seconds": time.perf_counter() - started,
      },
  )
  return True


def write_report(workdir: Path, plan: Plan, config) -> list[Path]:
  results: dict[str, list[dict]] = {}
  for run in plan.runs:
    results.setdefault(run.arm, []).append(json.loads((run.workdir / "eval.json").read_text()))
  rows = [report.aggregate_arm(arm, stage_results) for arm, stage_results in results.items()]
  meta = {
      "num_test": len(plan.test_records),
      "arms": list(results),
      "seeds": arms_lib.parse_seeds(config.seeds),
      "base_steps": plan.base.num_steps,
      "arm_steps": int(config.arm_steps),
      "combine_seeds": "counts pooled over seeds; Wilson 95% interval on the pooled counts",
  }
  json_path, md_path = report.write_tables(workdir, rows, meta)
  curves: dict[str, list] = {}
  for run in plan.runs:
    curves.setdefault(run.arm, []).append((run.label, run.workdir / "metrics.jsonl"))
  loss_png = report.plot_losses(workdir / "loss_curves.png", curves)
  accuracy_png = report.plot_accuracy(workdir / "accuracy.png", rows)
  return [md_path, json_path, loss_png, accuracy_png]


def run_experiment(
    config: ml_collections.ConfigDict, workdir: str | Path, devices: Sequence[jax.Device] | None = None
) -> list[Path]:
  """Runs (or resumes) every stage; returns the table and plot paths."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_text_atomically(workdir / "experiment_config.json", config.to_json_best_effort(indent=2) + "\n")
  plan = make_plan(config, workdir)
  stages = [("data", "base pool", 0), ("train", plan.base.label, plan.base.num_steps), ("eval", plan.base.label, 1)]
  for run in plan.arms:
    stages += [("train", run.label, run.num_steps), ("eval", run.label, 1)]
  progress = Progress(stages)

  def build_base_data() -> bool:
    return base_data.prepare_base_dataset(
        plan.base_data_dir,
        plan.demo_config,
        int(config.base.num_problems),
        float(config.base.error_fraction),
        int(config.base.practice_per_problem),
    )

  index = 0
  progress.run(index, build_base_data)
  for run in plan.runs:
    progress.run(index + 1, lambda run=run: train_stage(run, devices))
    progress.run(index + 2, lambda run=run: eval_stage(config, run, plan.test_records, devices))
    index += 2
  paths = write_report(workdir, plan, config)
  print(
      f"[{time.strftime('%H:%M:%S')}] experiment done in "
      f"{(time.perf_counter() - progress.start_time) / 60:.1f} min: " + ", ".join(str(p) for p in paths),
      flush=True,
  )
  return paths
