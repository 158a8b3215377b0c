"""The base stage's training data: SFT on partly noisy solutions to fresh problems.

The paper fine-tunes a pretrained base that can already answer, imperfectly. Here the base
imitates step-by-step solutions of which a share (`error_fraction`) carries one injected
error, as web text carries mistakes: it learns the answer format and much of the
arithmetic, but not to be reliable, so every arm has room to improve direct answers.

The problems come after the arms' training problems in the demo's train-split stream (the
demo guarantees the first n problems of a split do not depend on how many are asked for),
so the base never sees an arm's training problem, nor (being train-split) a test problem.

Beside the solutions it practises checking lines (`demo_task.compare_records`,
`practice_per_problem` records per problem), as a pretrained base has seen text that checks
arithmetic: every arm then starts from a model that can tell a right result from a wrong
one, and what the arms add is the objective.
"""

import dataclasses
import json
import random
from pathlib import Path

from cftjax import files
from cftjax.data import demo_task, tfds_builder

DATASET_NAME = "experiment_base"
VALIDATION_FRACTION = 0.02


def base_pool_config(
    demo_config: demo_task.DemoConfig, num_problems: int, error_fraction: float
) -> demo_task.DemoConfig:
  """A demo config whose train split is the arms' problems followed by `num_problems` more."""
  if num_problems < 2:
    raise ValueError(f"config key base.num_problems={num_problems} must be >= 2 (train and validation rows)")
  return dataclasses.replace(
      demo_config,
      num_train=demo_config.num_train + num_problems,
      num_validation=0,
      num_test=0,
      error_fraction=float(error_fraction),
  )


def base_records(demo_config: demo_task.DemoConfig, num_problems: int, error_fraction: float) -> list[dict]:
  """SFT rows {"query", "response"}: noisy responses to the base pool's problems."""
  pool = base_pool_config(demo_config, num_problems, error_fraction)
  train = demo_task.generate_split(pool, "train")
  return [{"query": r["query"], "response": r["response"], "label": r["label"]} for r in train[demo_config.num_train :]]


def practice_records(demo_config: demo_task.DemoConfig, num_problems: int, per_problem: int) -> list[dict]:
  """SFT rows {"query", "response"}: `per_problem` x `num_problems` check-practice lines."""
  practice = dataclasses.replace(demo_config, num_train=num_problems, compare_per_problem=per_problem)
  return [{"query": r["query"], "response": r["response"]} for r in demo_task.compare_records(practice, "train")]


def prepare_base_dataset(
    directory: str | Path,
    demo_config: demo_task.DemoConfig,
    num_problems: int,
    error_fraction: float,
    practice_per_problem: int = 0,
) -> bool:
  """Writes the base pool as a tfds dataset `DATASET_NAME` under `directory` (the base
  stage's data_dir) once; returns whether it built it.

  A finished dataset whose recorded settings match is reused; one written for other
  settings is rebuilt.
  """
  directory = Path(directory)
  settings = {
      "demo": demo_task.config_json(demo_config),
      "num_problems": int(num_problems),
      "error_fraction": float(error_fraction),
      "practice_per_problem": int(practice_per_problem),
  }
  settings_path = directory / "settings.json"
  info = tfds_builder.dataset_dir_of(DATASET_NAME, directory) / "dataset_info.json"
  if info.is_file() and settings_path.is_file() and json.loads(settings_path.read_text()) == settings:
    return False
  directory.mkdir(parents=True, exist_ok=True)
  rows = [
      {"query": r["query"], "response": r["response"]} for r in base_records(demo_config, num_problems, error_fraction)
  ]
  rows += practice_records(demo_config, num_problems, practice_per_problem)
  random.Random(f"cftjax-experiment-base:{demo_config.seed}").shuffle(rows)  # both kinds in validation
  # The pool's last rows are its validation split: never empty, so validation loss works.
  num_validation = max(1, round(VALIDATION_FRACTION * len(rows)))
  train_path, validation_path = directory / "base_sft.train.jsonl", directory / "base_sft.validation.jsonl"
  demo_task.write_jsonl(train_path, rows[:-num_validation])
  demo_task.write_jsonl(validation_path, rows[-num_validation:])
  tfds_builder.build_dataset(
      [train_path],
      format="sft",
      name=DATASET_NAME,
      data_dir=directory,
      validation_inputs=[validation_path],
      overwrite=True,
  )
  files.write_json_atomically(settings_path, settings)
  return True
