"""Checkpoint selection end to end on a tiny run: every kept step scored on two math
benchmarks, one table row per step with the best one named, finished pairs not redone;
scripts/eval.py and scripts/compare.py on the command line; sharded (fsdp=8) evaluation
gives the single-device outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from cftjax import checkpoint, evaluate, selection, train
from configs import demo

REPO = Path(__file__).resolve().parent.parent
STEPS = (5, 10, 15)
TINY = {
    "data.demo.num_train": 48,
    "data.demo.num_validation": 8,
    "data.demo.num_test": 8,
    "data.max_length": 64,
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.head_dim": 16,
    "model.intermediate_size": 64,
}
PROBLEMS = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]


def make_run(root: Path, name: str, seed: int) -> Path:
  """A run directory whose kept steps hold different (random) weights."""
  config = demo.get_config()
  config.data.data_dir = str(root / "data")
  config.update_from_flattened_dict(TINY)
  model, _ = train.build_model(config)
  run = root / name
  for i, step in enumerate(STEPS):
    params = nn.meta.unbox(jax.jit(train.init_params_fn(model, seed=seed + i))())
    checkpoint.save_params(run / "checkpoints", params, config, step=step)
  return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("selection")
  for name, rows in (("math_a", PROBLEMS), ("math_b", PROBLEMS[:2])):
    with open(root / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return root, make_run(root, "cft", 0), make_run(root, "sft", 10)


def score_fn(run, calls):
  def score(step, path, out):
    calls.append((step, Path(path).stem))
    loaded = evaluate.load(run, step, devices=jax.devices()[:1])
    rows, summary = evaluate.run_math(loaded, path, evaluate.sampling_for(loaded, 4), 4, None, progress=False)
    evaluate.write_results(out, "math", rows, summary)
    return summary

  return score


def test_sweep_scores_every_kept_step_once_and_names_the_best(runs):
  root, cft, _ = runs
  files = [str(root / "math_a.jsonl"), str(root / "math_b.jsonl")]
  calls = []
  table = selection.sweep(cft, files, score_fn(cft, calls), log=lambda _: None)
  assert sorted(calls) == sorted((s, b) for s in STEPS for b in ("math_a", "math_b"))
  assert [r["step"] for r in table["rows"]] == list(STEPS)
  summaries = {
      (s, b): json.loads((cft / "eval" / "steps" / str(s) / b / "math_summary.json").read_text())
      for s in STEPS
      for b in ("math_a", "math_b")
  }
  for row in table["rows"]:
    assert row["scores"]["math_a"] == summaries[row["step"], "math_a"]["accuracy"]
    assert row["average"] == pytest.approx((row["scores"]["math_a"] + row["scores"]["math_b"]) / 2)
  best = max(STEPS, key=lambda s: (summaries[s, "math_a"]["accuracy"], -s))
  assert table["best_step"] == best and table["select_by"] == "math_a"
  assert json.loads((cft / "eval" / "table.json").read_text()) == table
  assert f"| {best} (best) |" in (cft / "eval" / "table.md").read_text()
  # A rerun recomputes nothing.
  again = []
  assert selection.sweep(cft, files, score_fn(cft, again), log=lambda _: None) == table and again == []


def test_best_step_and_table_on_hand_made_scores():
  scores = {10: {"a": 0.2, "b": 0.9}, 20: {"a": 0.5, "b": 0.1}, 30: {"a": 0.5, "b": 0.3}}
  assert selection.build_table(scores, ["a", "b"], "a")["best_step"] == 20  # tie -> earliest
  table = selection.build_table(scores, ["a", "b"], "b")
  assert table["best_step"] == 10 and table["rows"][0]["average"] == pytest.approx(0.55)
  with pytest.raises(ValueError, match="select_by"):
    selection.sweep("unused", ["x/a.jsonl"], None, select_by="zzz")


def _script(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_eval_and_compare_scripts(runs, tmp_path):
  root, cft, sft = runs
  files = f"{root / 'math_a.jsonl'},{root / 'math_b.jsonl'}"
  for run in (cft, sft):  # cft's pairs exist from the sweep test when run together; sft is scored here
    done = _script(
        "scripts/eval.py",
        f"--checkpoint={run}",
        "--steps=all",
        "--task=math",
        f"--data={files}",
        "--select_by=math_b",
        "--max_new_tokens=4",
        "--batch_size=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((run / "eval" / "table.json").read_text())
    assert [r["step"] for r in table["rows"]] == list(STEPS) and table["select_by"] == "math_b"
  done = _script("scripts/compare.py", str(cft), str(sft), f"--out={tmp_path}")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "compare.json").read_text())
  assert [r["run"] for r in result["runs"]] == ["cft", "sft"] and result["benchmarks"] == ["math_a", "math_b"]
  for r, run in zip(result["runs"], (cft, sft)):
    table = json.loads((run / "eval" / "table.json").read_text())
    assert r["best_step"] == table["best_step"]
    best = next(row for row in table["rows"] if row["step"] == table["best_step"])
    assert r["scores"] == best["scores"] and r["average"] == pytest.approx(best["average"])
  assert "| cft |" in (tmp_path / "compare.md").read_text()
  assert (tmp_path / "accuracy_vs_step.png").read_bytes()[:4] == b"\x89PNG"


def test_sharded_fsdp8_evaluation_equals_one_device(runs):
  root, cft, _ = runs
  one = evaluate.load(cft, 10, devices=jax.devices()[:1])
  eight = evaluate.load(cft, 10, ml_collections.ConfigDict({"data": 1, "fsdp": 8, "tensor": 1}))
  embed = eight.params["embed"]["embedding"]
  assert len({str(s.index) for s in embed.addressable_shards}) == 8  # really split 8 ways
  path = str(root / "math_a.jsonl")
  outs = [
      evaluate.run_math(m, path, evaluate.sampling_for(m, 6), 8, None, progress=False)[0]["math"] for m in (one, eight)
  ]
  assert [r["output"] for r in outs[0]] == [r["output"] for r in outs[1]]
  half = evaluate.load(cft, 10, ml_collections.ConfigDict({"data": 1, "fsdp": 8, "tensor": 1}), dtype="bfloat16")
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(half.params))
  np.testing.assert_allclose(
      np.asarray(half.params["embed"]["embedding"], np.float32), np.asarray(embed), rtol=2**-8
  )  # bf16 keeps 8 significant bits


def test_in_training_math_evaluator_reports_benchmark_accuracy(runs):
  """The loop's plug-in (cftjax.evaluators): any data source, named val_<stem>_accuracy."""
  from cftjax import evaluators

  root, cft, _ = runs
  loaded = evaluate.load(cft, 5, devices=jax.devices()[:1])
  config = ml_collections.ConfigDict(loaded.config.to_dict())
  config.data.source = "tfds"
  config.train.eval_math_data = str(root / "math_b.jsonl")
  config.train.eval_math_examples = 1
  config.train.eval_generation_max_new_tokens = 4
  built = evaluators.from_config(config)
  assert built == [evaluators.MathBenchmark(str(root / "math_b.jsonl"), 1, 4)]
  ctx = evaluators.EvalContext(loaded.model, loaded.params, config, loaded.tokenizer, loaded.mesh, step=5)
  metrics = built[0](ctx)
  _, summary = evaluate.run_math(
      loaded, str(root / "math_b.jsonl"), evaluate.sampling_for(loaded, 4), 32, 1, progress=False
  )
  assert metrics == {"val_math_b_accuracy": summary["accuracy"]}
  config.train.eval_math_data = str(root / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="train.eval_math_data"):
    evaluators.from_config(config)
  config.train.eval_math_data, config.train.eval_generation_examples = "", 2
  with pytest.raises(ValueError, match="data.source=demo"):
    evaluators.from_config(config)
