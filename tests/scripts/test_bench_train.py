"""scripts/bench_train.py end to end on a small batch: both sides build the same model and
the row reports what they measured (the figures themselves belong to the README)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"
sys.path.insert(0, str(SCRIPT.parent))

import bench_train  # noqa: E402


def test_bench_train_runs_both_sides_on_the_same_shape(tmp_path):
  out = tmp_path / "bench.json"
  args = ["--shapes=demo", "--batch=2", "--length=32", "--steps=2", "--warmup=1", "--nomatmul", f"--out={out}"]
  done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  (row,) = json.loads(out.read_text())
  assert row["shape"] == "demo" and row["batch"] == 2 and row["length"] == 32 and row["row_groups"] == 0
  assert row["params"] == bench_train.model_config("demo").num_params()  # torch's count matched it
  for side in ("jax", "torch"):
    assert row[f"{side}_tokens_per_s"] == pytest.approx(2 * 32 / row[f"{side}_step_s"])
  assert row["ratio"] == pytest.approx(row["jax_tokens_per_s"] / row["torch_tokens_per_s"])
  assert "ratio" in done.stdout and "row_groups=auto" in done.stdout


@pytest.mark.parametrize("shape", ["demo", "45m", "110m"])
def test_matmul_shapes_are_the_projections_of_the_model(shape):
  """The bare-matmul ceiling covers every projection once: its FLOPs are 2 x tokens x the
  parameters outside the embedding and the norms."""
  config = bench_train.model_config(shape)
  tokens = 64
  flops = sum(
      2 * rows * fan_in * fan_out
      for rows, fan_in, fan_out in bench_train.matmul_shapes(bench_train.SHAPES[shape], tokens)
  )
  norms = (2 * config.num_layers + 1) * config.hidden_size
  embedding = config.vocab_size * config.hidden_size
  assert flops == 2 * tokens * (config.num_params() - norms - embedding)
