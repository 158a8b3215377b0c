"""Evaluation from checkpoints: restore onto another mesh than training used, run the demo
task end to end, and score critiques and answers through the grading functions."""

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from cftjax import evaluate, evaluators, train
from configs import demo

TINY = {
    "data.demo.num_train": 48,
    "data.demo.num_validation": 8,
    "data.demo.num_test": 8,
    "data.max_length": 128,
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.head_dim": 8,
    "model.intermediate_size": 64,
    "train.global_batch_size": 8,
    "train.num_steps": 2,
    "train.log_every": 1,
    "train.eval_every": 0,
    "optim.warmup_steps": 1,
    "checkpoint.every_steps": 2,
    "checkpoint.async_save": False,
    # Trained on all 8 simulated devices with parameters split over fsdp and tensor.
    "mesh.data": 1,
    "mesh.fsdp": 4,
    "mesh.tensor": 2,
}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  config = demo.get_config()
  config.data.data_dir = str(root / "data")
  config.update_from_flattened_dict(TINY)
  workdir = root / "run"
  train.run(config, workdir)
  return workdir


def test_restore_onto_one_device_equals_eight_device_training(sharded_run):
  one = evaluate.load(sharded_run, devices=jax.devices()[:1])
  eight = evaluate.load(sharded_run, mesh_config=ml_collections.ConfigDict({"data": 1, "fsdp": 4, "tensor": 2}))
  assert one.mesh.devices.size == 1 and eight.mesh.devices.size == 8
  embed = eight.params["embed"]["embedding"]
  assert len({str(s.index) for s in embed.addressable_shards}) > 1  # really split on 8 devices
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_demo_task_end_to_end_writes_rows_and_summary(sharded_run, tmp_path):
  loaded = evaluate.load(sharded_run, devices=jax.devices()[:1])
  sampling = evaluate.sampling_for(loaded, max_new_tokens=12)
  rows, summary = evaluate.run_demo(loaded, sampling, batch_size=4, limit=6, progress=False)
  assert len(rows["answers"]) == 6 and len(rows["critiques"]) == 6
  assert 0.0 <= summary["answer_accuracy"] <= 1.0
  assert summary["critique_n"] == 6
  # An untrained model writes no "Conclusion:" line: unparseable counts, it does not crash.
  assert summary["critique_unparsed"] == sum(r["verdict"] is None for r in rows["critiques"])
  out = evaluate.write_results(tmp_path, "demo", rows, summary)
  assert json.loads((out / "demo_summary.json").read_text()) == summary
  lines = (out / "demo_critiques.jsonl").read_text().splitlines()
  assert {"output", "verdict", "label"} <= set(json.loads(lines[0]))


def test_scoring_rows_uses_verdicts_and_answers():
  critiques, scores = evaluate.critique_rows(
      [{"label": "wrong"}, {"label": "right"}, {"label": "wrong"}],
      ["...\nConclusion: wrong", "Conclusion: wrong", "no verdict"],
  )
  assert [r["correct"] for r in critiques] == [True, False, False]
  assert scores["tp"] == 1 and scores["fp"] == 1 and scores["unparsed"] == 1
  by_kind = evaluate.demo_verdicts_by_error_kind(
      [
          {"query": "Start with 12. Add 3, then subtract 4. What is the result?", "response": response}
          for response in (
              "Step 1: 12 + 3 = 16\nStep 2: 16 - 4 = 12\nThe answer is 12.",
              "Step 1: 12 + 3 = 15\nStep 2: 15 - 4 = 11\nThe answer is 11.",
              "Step 1: 12 + 3 = 15\nStep 2: 17 - 4 = 13\nThe answer is 13.",
          )
      ],
      critiques,
  )
  assert by_kind == {
      "critique_accuracy_right": 0.0,
      "critique_accuracy_arithmetic": 1.0,
      "critique_accuracy_carried": 0.0,
  }
  answers, summary = evaluate.answer_rows(
      [{"answer": "58"}, {"answer": "7"}], ["Step 1: ...\nThe answer is 58.", "I think \\boxed{8}"]
  )
  assert [r["correct"] for r in answers] == [True, False] and summary["accuracy"] == 0.5


def test_in_training_generation_metric_drives_best_checkpoint(tmp_path):
  config = demo.get_config()
  config.data.data_dir = str(tmp_path / "data")
  config.update_from_flattened_dict(
      {
          **TINY,
          "mesh.fsdp": 1,
          "mesh.tensor": 1,
          "train.global_batch_size": 2,
          "train.num_steps": 4,
          "train.eval_every": 1,
          "train.eval_batches": 1,
          "checkpoint.every_steps": 1,
          "checkpoint.keep": 1,
          "train.eval_generation_examples": 2,
          "train.eval_generation_max_new_tokens": 4,
          "checkpoint.best_metric": "val_critique_accuracy",
          "checkpoint.best_mode": "max",
          "checkpoint.keep_best": 1,
      }
  )
  train.run(config, tmp_path / "run", devices=jax.devices()[:1], evaluators=evaluators.from_config(config))
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  generated = [l for l in lines if "val_critique_accuracy" in l]
  assert len(generated) == 4 and all(0.0 <= l["val_answer_accuracy"] <= 1.0 for l in generated)
  kept = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert 4 in kept  # the newest always survives best-N retention
