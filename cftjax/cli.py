"""What the scripts call: one function per command, so scripts stay thin."""

import os
import sys
from pathlib import Path

import jax


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run when the environment describes one (TPU pod slice, or
  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID set by a launcher)."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  elif "," in tpu_hosts:
    jax.distributed.initialize()  # Cloud TPU pods describe themselves


def default_workdir(config_filename: str) -> Path:
  return Path("runs") / Path(config_filename.split(":")[0]).stem


def train_main(config, workdir: str | None, config_filename: str) -> None:
  from cftjax import train

  quiet_library_logs()
  maybe_initialize_distributed()
  workdir = Path(workdir) if workdir else default_workdir(config_filename)
  try:
    result = train.run(config, workdir)
  except train.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {result.final_step}; checkpoints, metrics.jsonl and config.json in {result.workdir}")


def experiment_main(config, workdir: str | None, config_filename: str) -> None:
  from cftjax import train
  from cftjax.experiment import runner

  quiet_library_logs()
  workdir = Path(workdir) if workdir else default_workdir(config_filename)
  try:
    runner.run_experiment(config, workdir)
  except train.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def quiet_library_logs() -> None:
  """Library INFO logs (orbax, absl) would bury the progress lines users read."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)


def eval_main(flags) -> None:
  from cftjax import evaluate

  quiet_library_logs()
  if flags.task in ("math", "critique") and not flags.data:
    sys.exit(f"error: --task={flags.task} needs --data=FILE.jsonl")
  loaded = evaluate.load(flags.checkpoint, flags.step)
  max_new = flags.max_new_tokens or (384 if flags.task == "demo" else 2048)
  sampling = evaluate.sampling_for(loaded, max_new, flags.temperature, flags.top_p, flags.seed)
  if flags.task == "demo":
    rows, summary = evaluate.run_demo(loaded, sampling, flags.batch_size, flags.limit)
  elif flags.task == "math":
    rows, summary = evaluate.run_math(loaded, flags.data, sampling, flags.batch_size, flags.limit)
  else:
    rows, summary = evaluate.run_critique(loaded, flags.data, sampling, flags.batch_size, flags.limit)
  out = Path(flags.out) if flags.out else Path(flags.checkpoint) / "eval" / flags.task
  evaluate.write_results(out, flags.task, rows, summary)
  print(evaluate.format_summary(flags.task, summary))
  print(f"per-example results and {flags.task}_summary.json in {out}")
