"""The training loop end to end on a tiny model (1 of the 8 simulated CPU devices).

Resume is bit-identical to an uninterrupted run (losses, parameters, data batches), the
loss falls, a NaN stops the run without saving the bad state, SIGTERM saves and exits,
metrics reach metrics.jsonl and TensorBoard, and a mistyped config key fails loudly.

One persistent compilation cache serves the whole module: runs with the same config
compile once, which keeps this file inside the CI time budget.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from cftjax import checkpoint as ckpt
from cftjax import optim, sharding, train
from cftjax.data import pipeline
from cftjax.data import sources as sources_lib
from configs import demo

REPO = Path(__file__).resolve().parent.parent
N = 3  # checkpoint interval; the reference run takes 2N steps
ONE_DEVICE = jax.devices()[:1]

TINY = {
    "data.demo.num_train": 64,
    "data.demo.num_validation": 16,
    "data.demo.num_test": 8,
    "data.max_length": 128,
    "data.mixture": "demo_cft:1,demo_sft:1",
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.head_dim": 16,
    "model.intermediate_size": 64,
    "train.global_batch_size": 4,
    "train.num_steps": 2 * N,
    "train.log_every": 1,
    "train.eval_every": N,
    "train.eval_batches": 1,
    "optim.learning_rate": 1e-2,
    # Warmup then constant: the program does not depend on train.num_steps, so runs of
    # different lengths share one compiled step (the lr still depends on the restored step).
    "optim.schedule": "constant",
    "optim.warmup_steps": 2,
    "mesh.data": 1,
    "checkpoint.every_steps": N,
    "checkpoint.keep": 3,
    "checkpoint.async_save": True,
}
STEP_KEYS = (
    "loss",
    "loss_cft",
    "loss_sft",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "nonpad_fraction",
    "step_time",
)


def tiny_config(data_dir: Path, **changes) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.data.data_dir = str(data_dir)
  config.update_from_flattened_dict({**TINY, **changes})
  return config


def override_flags(data_dir: Path, **changes) -> list[str]:
  values = {**TINY, "data.data_dir": str(data_dir), **changes}
  return [f"--config.{key}={value}" for key, value in values.items()]


def xla_flags_with_devices(count: int) -> str:
  """This session's XLA flags (conftest's compile settings) with another device count."""
  kept = [
      f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def step_lines(workdir: Path) -> dict[int, dict]:
  lines = [m for m in read_metrics(workdir) if "loss" in m]
  steps = [m["step"] for m in lines]
  assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
  return {m["step"]: m for m in lines}


def checkpoint_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _model_and_tx(config):
  model, _ = train.build_model(config)
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  return model, tx


def final_params(config, workdir: Path):
  layout = train.state_layout(*_model_and_tx(config), sharding.make_mesh(config.mesh, ONE_DEVICE), config.seed)
  return jax.device_get(ckpt.load_params(workdir, layout.abstract["params"]))


class Preempted(Exception):
  """Stands in for a crash or a killed host in the middle of a run."""


def spy_on_batches(monkeypatch, seen: list, fail_at: int | None = None) -> None:
  """Records every training batch (batch_stats sees exactly those); optionally crashes."""
  real = pipeline.batch_stats

  def spy(batch):
    seen.append({k: v.copy() for k, v in batch.items()})
    if fail_at is not None and len(seen) == fail_at:
      raise Preempted(f"simulated preemption before training on batch {fail_at}")
    return real(batch)

  monkeypatch.setattr(pipeline, "batch_stats", spy)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory) -> None:
  """Runs of one config here compile once (jax rebuilds the jitted step per train.run)."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("demo_data")
  sources_lib.prepare(tiny_config(path).data)  # built once, reused by every run here
  return path


def reference_run(data_dir: Path, workdir: Path):
  """An uninterrupted 2N-step run: (result, training batches)."""
  seen: list = []
  with pytest.MonkeyPatch.context() as monkeypatch:
    spy_on_batches(monkeypatch, seen)
    result = train.run(tiny_config(data_dir), workdir, ONE_DEVICE)
  return result, seen


def test_run_learns_logs_and_resumes_bit_identically(data_dir, tmp_path, monkeypatch, capsys):
  """The reference run, then the same run crashed after step N+1 and resumed. One test, so
  the reference run happens once however pytest-xdist spreads the tests."""
  ref_dir = tmp_path / "reference"
  ref_result, ref_batches = reference_run(data_dir, ref_dir)
  check_loss_falls(ref_dir)
  check_metrics_logged(ref_dir, ref_result, ref_batches, data_dir)
  capsys.readouterr()
  check_resume_after_a_crash(data_dir, tmp_path / "run", ref_dir, ref_result, ref_batches, monkeypatch, capsys)
  check_resume_past_a_damaged_checkpoint(data_dir, tmp_path / "damaged", ref_dir, capsys)


def check_resume_past_a_damaged_checkpoint(data_dir, workdir, ref_dir, capsys):
  """The reference run's newest checkpoint emptied (a full disk): resume warns in one line,
  sets it aside and continues from step N exactly as the uninterrupted run did."""
  shutil.copytree(ref_dir, workdir)
  (workdir / "checkpoints" / str(2 * N) / "state" / "manifest.ocdbt").write_bytes(b"")
  capsys.readouterr()
  result = train.run(tiny_config(data_dir), workdir, ONE_DEVICE)
  out = capsys.readouterr()
  assert f"checkpoint {workdir / 'checkpoints' / str(2 * N)} is unreadable" in out.err, out.err
  assert f"resumed from {workdir / 'checkpoints' / str(N)}" in out.out
  assert result.final_step == 2 * N
  assert (workdir / "checkpoints" / f"{2 * N}.damaged").is_dir()
  got, want = step_lines(workdir), step_lines(ref_dir)
  assert sorted(got) == list(range(1, 2 * N + 1))
  for step in range(N + 1, 2 * N + 1):
    assert got[step]["loss"] == want[step]["loss"], f"step {step}"


def check_resume_after_a_crash(data_dir, workdir, ref_dir, ref_result, ref_batches, monkeypatch, capsys):
  config = tiny_config(data_dir)

  # Crash after step N+1: trained and logged, but only step N is checkpointed.
  first_batches: list = []
  spy_on_batches(monkeypatch, first_batches, fail_at=N + 2)
  with pytest.raises(Preempted):
    train.run(config, workdir, ONE_DEVICE)
  assert checkpoint_steps(workdir) == [N]
  assert max(step_lines(workdir)) == N + 1

  resumed_batches: list = []
  spy_on_batches(monkeypatch, resumed_batches)
  result = train.run(config, workdir, ONE_DEVICE)
  assert f"resumed from {workdir / 'checkpoints' / str(N)}" in capsys.readouterr().out
  assert result.final_step == ref_result.final_step == 2 * N

  # The restored iterator hands out exactly the batches the uninterrupted run saw.
  assert len(resumed_batches) == N
  for step, (got, want) in enumerate(zip(resumed_batches, ref_batches[N:]), start=N + 1):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch of step {step}, {key}")

  # Per-step losses (and validation) are bit-identical; the crashed run's step N+1 line
  # moved aside so each step is logged once.
  got, want = step_lines(workdir), step_lines(ref_dir)
  assert sorted(got) == sorted(want) == list(range(1, 2 * N + 1))
  for step in want:
    for key in ("loss", "loss_cft", "loss_sft", "grad_norm", "learning_rate", "param_norm"):
      assert got[step][key] == want[step][key], f"step {step} {key}: {got[step][key]} != {want[step][key]}"
  val = lambda d: [(m["step"], m["val_loss"]) for m in read_metrics(d) if "val_loss" in m]
  assert val(workdir) == val(ref_dir) and len(val(ref_dir)) == 2
  discarded = (workdir / "metrics.discarded.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in discarded] == [N + 1]

  got_params, want_params = final_params(config, workdir), final_params(config, ref_dir)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def check_loss_falls(workdir: Path):
  losses = [m["loss"] for _, m in sorted(step_lines(workdir).items())]
  assert losses[-1] < losses[0] - 0.5, losses


def check_metrics_logged(workdir: Path, result, batches, data_dir: Path):
  """metrics.jsonl holds every step's metrics; TensorBoard events and config.json exist."""
  lines = step_lines(workdir)
  for step, m in lines.items():
    missing = [k for k in STEP_KEYS if k not in m]
    assert not missing, f"step {step} lacks {missing}"
    assert all(math.isfinite(m[k]) for k in STEP_KEYS)
    assert m["tokens_per_second"] > 0 and m["step_time"] > 0 and 0 < m["nonpad_fraction"] <= 1
    assert m["examples"] > 0
  # A two-source mixture reports each source and each objective.
  assert {"loss_source/demo_cft", "loss_source/demo_sft"} <= set(lines[1])
  assert sum(m["tokens_cft"] for m in lines.values()) > 0 and sum(m["tokens_sft"] for m in lines.values()) > 0
  # The logged packing efficiency is the batches' own.
  for step, batch in enumerate(batches, start=1):
    assert lines[step]["nonpad_fraction"] == pytest.approx(float(np.mean(batch["inputs_segment_ids"] > 0)))
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["hidden_size"] == 32 and saved["data"]["data_dir"] == str(data_dir)
  assert checkpoint_steps(workdir) == [N, 2 * N]
  assert result.last_metrics["loss"] == lines[2 * N]["loss"]
  # The built demo tokenizer is kept with the run, and evaluation finds it there.
  config = tiny_config(data_dir)
  built = sources_lib.tokenizer_path(config.data, sources_lib.prepare(config.data))
  assert (workdir / "tokenizer" / "tokenizer.model").read_bytes() == Path(built).read_bytes()
  assert sources_lib.tokenizer_path(config.data, checkpoint_dir=workdir / "checkpoints") == str(workdir / "tokenizer")
  # So are the demo's test records, which evaluation reads from there.
  test_records = sources_lib.prepare(config.data).records("test", "cft")
  assert sources_lib.demo_eval_records(config.data, "test", workdir / "checkpoints") == test_records
  assert (workdir / sources_lib.KEPT_DEMO_DIR / "test.cft.jsonl").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  # A learning rate this large blows the parameters up after the first update: step 2's
  # gradient is NaN (its loss may still look finite) and would poison what it writes.
  config = tiny_config(
      data_dir,
      **{"optim.learning_rate": 1e30, "optim.warmup_steps": 0, "checkpoint.every_steps": 1, "train.eval_every": 0},
  )
  with pytest.raises(train.TrainingStopped) as stopped:
    train.run(config, tmp_path, ONE_DEVICE)
  assert re.search(
      r"(loss|grad_norm) is (nan|inf).* at step 2: stopping without saving; "
      r"the last good checkpoint .* step 1\) is intact",
      str(stopped.value),
  ), stopped.value
  assert checkpoint_steps(tmp_path) == [1]  # the bad state of step 2 was not saved
  bad = step_lines(tmp_path)[2]  # logged, for the record
  assert "nan" in (bad["loss"], bad["grad_norm"]) or "inf" in (bad["loss"], bad["grad_norm"])
  params = jax.device_get(
      ckpt.load_params(
          tmp_path,
          train.state_layout(*_model_and_tx(config), sharding.make_mesh(config.mesh, ONE_DEVICE), config.seed).abstract[
              "params"
          ],
      )
  )
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def _wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
  """Reads the child's output until a line matches; fails with everything it said."""
  lines, deadline = [], time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if re.search(pattern, line):
      return lines
  proc.kill()
  pytest.fail(f"no line matching {pattern!r} within {timeout}s; output:\n{''.join(lines)}")


def test_sigterm_saves_at_the_next_step_and_resume_continues(data_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  changes = {"train.num_steps": 100000, "checkpoint.every_steps": 100000, "train.eval_every": 0}
  env = {**os.environ, "XLA_FLAGS": xla_flags_with_devices(1), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, "scripts/train.py", f"--workdir={workdir}", *override_flags(data_dir, **changes)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  try:
    lines = _wait_for_line(proc, r"step 1/100000", timeout=240)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  out = "".join(lines) + out
  assert proc.returncode == 0, out
  match = re.search(r"SIGTERM: saved checkpoint at step (\d+), exiting", out)
  assert match, out
  saved = int(match.group(1))
  assert saved > 0 and checkpoint_steps(workdir) == [saved]
  assert f"done: step {saved}" in out

  # Resume in this process (the reference run's compiled step fits: same program) for two steps.
  config = tiny_config(data_dir, **{**changes, "train.num_steps": saved + 2})
  result = train.run(config, workdir, ONE_DEVICE)
  assert f"resumed from {workdir / 'checkpoints' / str(saved)}" in capsys.readouterr().out
  assert result.final_step == saved + 2
  assert sorted(step_lines(workdir)) == list(range(1, saved + 3))
  assert checkpoint_steps(workdir) == [saved, saved + 2]


def test_mistyped_config_key_fails_naming_it(tmp_path):
  proc = subprocess.run(
      [sys.executable, "scripts/train.py", f"--workdir={tmp_path}", "--config.train.nonexistent=1"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode != 0
  assert "nonexistent" in proc.stderr, proc.stderr
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("mixture", ["demo_cft:1", "demo_cft:3,demo_sft:1"])
def test_estimated_steps_are_the_batches_of_the_epochs(data_dir, mixture, packing):
  """train.num_steps=-1 sizes the schedule to the data: packing leaves padding, and a 3:1
  mixture ends its epoch when its first source runs out."""
  config = tiny_config(
      data_dir, **{"data.mixture": mixture, "data.packing": packing, "data.max_length": 512, "data.num_epochs": 2}
  )
  sources = sources_lib.load_sources(config.data, "train")
  tokenizer = sources_lib.tokenizer_path(config.data, sources_lib.prepare(config.data))
  batches = sum(1 for _ in pipeline.make_dataset(config.data, sources, tokenizer, rows=4, train=True))
  estimate = train.estimate_num_steps(config, sources, tokenizer, 4)
  assert abs(estimate - batches) <= 1, (batches, estimate)  # epoch 2 packs a new order


def test_a_workdir_keeps_the_tokenizer_it_was_trained_with(tmp_path):
  built = tmp_path / "built.model"
  built.write_bytes(b"tokenizer one")
  workdir = tmp_path / "run"
  train.keep_tokenizer(str(built), workdir)
  train.keep_tokenizer(str(built), workdir)  # a resume with the same tokenizer goes on
  assert (workdir / "tokenizer" / "tokenizer.model").read_bytes() == b"tokenizer one"
  built.write_bytes(b"tokenizer two")  # the data code now builds another one
  with pytest.raises(ValueError, match="trained with"):
    train.keep_tokenizer(str(built), workdir)
  assert (workdir / "tokenizer" / "tokenizer.model").read_bytes() == b"tokenizer one"
