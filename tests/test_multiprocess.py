"""Two JAX processes on one machine (2 simulated CPU devices each, gloo collectives) train
the tiny config together: they agree on every loss, each reads its own shard of the data,
a SIGTERM that reaches only one of them makes both save the same step, the resumed run
restores each process's iterator exactly, and when one shard runs out first both stop.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cftjax.data import pipeline
from cftjax.data import sources as sources_lib
from configs import demo

REPO = Path(__file__).resolve().parent.parent
NUM_TRAIN = 201  # shards of 101 and 100 examples: 51 and 50 batches of 2 rows (1 example each)
SETTINGS = {
    "data.demo.num_train": NUM_TRAIN,
    "data.demo.num_validation": 8,
    "data.demo.num_test": 8,
    "data.max_length": 192,  # a demo CFT example is ~130-170 tokens: one example per row
    "data.mixture": "demo_cft:1.0",
    "data.num_epochs": 1,  # the run ends when the data does
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.head_dim": 16,
    "model.intermediate_size": 64,
    "train.global_batch_size": 4,
    "train.num_steps": 1000,
    "train.log_every": 1,
    "train.eval_every": 0,
    "optim.learning_rate": 1e-2,
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "checkpoint.every_steps": 1000,
    "mesh.data": -1,
}

DRIVER = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # tensorboardX imports torch when present; these runs need no torch
    sys.path.insert(0, sys.argv[1])
    from cftjax import cli
    cli.maybe_initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    import jax
    from cftjax import train
    from cftjax.data import pipeline
    from configs import demo

    batches, losses = [], {}
    real_stats, real_write = pipeline.batch_stats, train.metrics_lib.MetricsWriter.write

    def stats(batch):
      batches.append([batch["inputs"][r][batch["inputs_segment_ids"][r] > 0].tolist() for r in range(len(batch["inputs"]))])
      return real_stats(batch)

    def write(self, step, metrics):
      if "loss" in metrics:
        losses[step] = metrics["loss"]
      return real_write(self, step, metrics)

    pipeline.batch_stats, train.metrics_lib.MetricsWriter.write = stats, write
    config = demo.get_config()
    config.update_from_flattened_dict(json.loads(sys.argv[3]))
    result = train.run(config, sys.argv[2])
    with open(sys.argv[4], "w") as f:
      json.dump({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                 "final_step": result.final_step, "stopped": result.stopped_early, "losses": losses,
                 "batches": batches}, f)
""")


def xla_flags_with_devices(count: int) -> str:
  """This session's XLA flags (conftest's compile settings) with another device count."""
  kept = [
      f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  settings = {**SETTINGS, "data.data_dir": str(root / "data")}
  config = demo.get_config()
  config.update_from_flattened_dict(settings)
  sources_lib.prepare(config.data)  # built once here, not raced by the two processes
  (root / "driver.py").write_text(DRIVER)
  return root, settings, config


def launch(root: Path, settings: dict, attempt: str) -> list[subprocess.Popen]:
  """Both processes; process 0's output is piped (to watch), process 1's goes to a file."""
  port = free_port()
  procs = []
  for i in range(2):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags_with_devices(2),
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i),
        # Process 0 reuses its compiled programs on resume (process 1 compiles again).
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
    }
    with open(root / f"{attempt}_{i}.log", "w") as log:
      procs.append(
          subprocess.Popen(
              [
                  sys.executable,
                  str(root / "driver.py"),
                  str(REPO),
                  str(root / "run"),
                  json.dumps(settings),
                  str(root / f"{attempt}_{i}.json"),
              ],
              env=env,
              stdout=subprocess.PIPE if i == 0 else log,
              stderr=subprocess.STDOUT,
              text=True,
          )
      )
  return procs


def finish(procs, root: Path, attempt: str, first_lines: str = "", timeout: float = 240) -> list[dict]:
  deadline = time.monotonic() + timeout
  try:
    out0 = first_lines + procs[0].communicate(timeout=timeout)[0]
    for proc in procs[1:]:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pytest.fail(f"{attempt}: the processes did not finish in {timeout}s (a collective left hanging?)")
  finally:
    for proc in procs:
      proc.kill()
  outputs = [out0, (root / f"{attempt}_1.log").read_text()]
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f"{attempt}: process {i} failed:\n{outputs[i][-5000:]}"
  return [json.loads((root / f"{attempt}_{i}.json").read_text()) for i in range(2)]


def expected_batches(config, process_index: int) -> list[list[list[int]]]:
  """What process i of 2 should read: the pipeline, run here for that process index."""
  prepared = sources_lib.prepare(config.data)
  sources = sources_lib.load_sources(config.data, "train", prepared)
  ds = pipeline.make_dataset(
      config.data,
      sources,
      sources_lib.tokenizer_path(config.data, prepared),
      rows=2,
      train=True,
      process_index=process_index,
      process_count=2,
  )
  return [[b["inputs"][r][b["inputs_segment_ids"][r] > 0].tolist() for r in range(len(b["inputs"]))] for b in ds]


def test_two_processes_train_save_resume_and_stop_together(setup):
  root, settings, config = setup

  # Attempt 1: SIGTERM reaches process 1 only, early in the run.
  procs = launch(root, settings, "first")
  lines = []
  for line in procs[0].stdout:
    lines.append(line)
    if "step 1/1000" in line:
      procs[1].send_signal(signal.SIGTERM)
      break
  else:
    procs[1].kill()
  first = finish(procs, root, "first", "".join(lines))
  assert [r["processes"] for r in first] == [2, 2] and [r["devices"] for r in first] == [4, 4]
  saved = first[0]["final_step"]
  assert first[1]["final_step"] == saved and 1 <= saved < 50
  assert first[1]["stopped"] == "SIGTERM" and first[0]["stopped"] == "stop requested by another process"
  step_dir = root / "run" / "checkpoints" / str(saved)
  assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == [
      "process_0-of-2.json",
      "process_1-of-2.json",
  ]

  # Attempt 2: resume; shard 1 (50 batches) runs out before shard 0 (51): both stop at 50.
  second = finish(launch(root, settings, "second"), root, "second")
  assert [r["final_step"] for r in second] == [50, 50]
  assert [r["stopped"] for r in second] == ["data exhausted"] * 2
  assert (root / "run" / "checkpoints" / "50").is_dir()

  # Every loss is the global one: the same on both processes, finite, and in metrics.jsonl.
  for attempt in (first, second):
    assert attempt[0]["losses"] == attempt[1]["losses"]
  logged = {
      json.loads(line)["step"]: json.loads(line)["loss"]
      for line in (root / "run" / "metrics.jsonl").read_text().splitlines()
  }
  assert logged == {int(k): v for a in (first, second) for k, v in a[0]["losses"].items()}
  assert sorted(logged) == list(range(1, 51))

  # Each process read its own shard, in order, across the restart (process 0's 51st batch
  # was fetched but not trained: the other shard had run out).
  for i in range(2):
    read = first[i]["batches"] + second[i]["batches"]
    assert read[:50] == expected_batches(config, i)[:50]
  examples = [{tuple(ex) for r in (first, second) for b in r[i]["batches"] for ex in b if ex} for i in range(2)]
  assert not examples[0] & examples[1]
  assert len(examples[0]) + len(examples[1]) == NUM_TRAIN
