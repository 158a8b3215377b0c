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
  from cftjax import evaluators, train

  quiet_library_logs()
  maybe_initialize_distributed()
  workdir = Path(workdir) if workdir else default_workdir(config_filename)
  try:
    result = train.run(config, workdir, evaluators=evaluators.from_config(config))
  except train.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {result.final_step}; checkpoints, metrics.jsonl and config.json in {result.workdir}")


def dry_run_main(config, device_memory_gib: float | None = None) -> None:
  from cftjax import memory

  quiet_library_logs()
  capacity = None if device_memory_gib is None else int(device_memory_gib * memory.GIB)
  report = memory.dry_run(config, capacity=capacity)
  print(memory.format_report(report, config))
  if report.fits is False:
    sys.exit(1)


def quiet_library_logs() -> None:
  """Library INFO logs (orbax, absl) would bury the progress lines users read."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)


def eval_main(flags) -> None:
  import ml_collections

  from cftjax import evaluate, selection

  quiet_library_logs()
  if flags.task in ("math", "critique") and not flags.data:
    sys.exit(f"error: --task={flags.task} needs --data=FILE.jsonl")
  mesh_config = ml_collections.ConfigDict({"data": -1, "fsdp": flags["mesh.fsdp"].value,
                                           "tensor": flags["mesh.tensor"].value})
  max_new = flags.max_new_tokens or (384 if flags.task == "demo" else 2048)
  if flags.num_samples > 1 and flags.temperature == 0:
    sys.exit("error: --num_samples > 1 needs --temperature > 0 (greedy answers are all the same)")

  def evaluate_one(step, data, out):
    loaded = evaluate.load(flags.checkpoint, step, mesh_config, dtype=flags.dtype or None)
    sampling = evaluate.sampling_for(loaded, max_new, flags.temperature, flags.top_p, flags.seed)
    if flags.task == "demo":
      rows, summary = evaluate.run_demo(loaded, sampling, flags.batch_size, flags.limit)
    elif flags.task == "math":
      rows, summary = evaluate.run_math(loaded, data, sampling, flags.batch_size, flags.limit,
                                        num_samples=flags.num_samples)
    else:
      rows, summary = evaluate.run_critique(loaded, data, sampling, flags.batch_size, flags.limit)
    evaluate.write_results(out, flags.task, rows, summary)
    return summary

  if flags.steps:
    if flags.task != "math":
      sys.exit("error: --steps scores math benchmarks: use it with --task=math")
    steps = None if flags.steps == "all" else [int(s) for s in flags.steps.split(",")]
    table = selection.sweep(flags.checkpoint, flags.data.split(","), evaluate_one, flags.select_by, steps)
    out = selection.eval_dir(flags.checkpoint)
    print(selection.table_markdown(table))
    print(f"table.md and table.json in {out}")
    return
  if flags.task != "demo" and "," in flags.data:
    sys.exit("error: several --data files need --steps (e.g. --steps=all)")
  out = Path(flags.out) if flags.out else Path(flags.checkpoint) / "eval" / flags.task
  summary = evaluate_one(flags.step, flags.data, out)
  print(evaluate.format_summary(flags.task, summary))
  print(f"per-example results and {flags.task}_summary.json in {out}")


def compare_main(run_dirs, out_dir: str) -> None:
  from cftjax import selection

  result = selection.compare(run_dirs, out_dir)
  print((Path(out_dir) / "compare.md").read_text())
  print(f"compare.md, compare.json and accuracy_vs_step.png in {out_dir} ({len(result['runs'])} runs)")
