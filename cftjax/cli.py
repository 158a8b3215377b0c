"""What the scripts call: one function per command, so scripts stay thin."""

import sys
from pathlib import Path

import jax


def default_workdir(config_filename: str) -> Path:
  return Path("runs") / Path(config_filename.split(":")[0]).stem


def train_main(config, workdir: str | None, config_filename: str) -> None:
  from cftjax import train

  if jax.process_count() > 1:
    jax.distributed.initialize()
  workdir = Path(workdir) if workdir else default_workdir(config_filename)
  try:
    result = train.run(config, workdir)
  except train.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {result.final_step}; checkpoints, metrics.jsonl and config.json in {result.workdir}")
