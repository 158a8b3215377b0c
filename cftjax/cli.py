"""What the scripts call: one function per command, so scripts stay thin."""

import os
import sys
from pathlib import Path

import jax


def default_workdir(config_filename: str) -> Path:
  return Path("runs") / Path(config_filename.split(":")[0]).stem


def initialize_distributed(environ=os.environ) -> None:
  """Joins a multi-process run when the environment describes one; else stays one process.

  Must run before anything touches a JAX backend (jax.devices(), jax.process_count(), ...).
  Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID (several
  processes on one machine, GPU hosts without a scheduler). Otherwise jax's own cluster
  detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes) decides.
  """
  if environ.get("JAX_NUM_PROCESSES"):
    missing = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if not environ.get(k)]
    if missing:
      raise ValueError(f"JAX_NUM_PROCESSES is set, so {' and '.join(missing)} must be set too")
    jax.distributed.initialize(
        coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(environ["JAX_NUM_PROCESSES"]),
        process_id=int(environ["JAX_PROCESS_ID"]),
    )
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if "coordinator_address should be defined" not in str(e):
      raise  # a cluster was detected but is misconfigured: say so
    # No cluster detected: a single process.


def train_main(config, workdir: str | None, config_filename: str) -> None:
  from cftjax import train

  initialize_distributed()
  workdir = Path(workdir) if workdir else default_workdir(config_filename)
  try:
    result = train.run(config, workdir)
  except train.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {result.final_step}; checkpoints, metrics.jsonl and config.json in {result.workdir}")
