"""A tiny experiment end to end: base -> arms -> evaluation -> table and plots; then resume."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from cftjax import checkpoint as ckpt
from cftjax import evaluate, train
from cftjax.experiment import runner
from configs import experiment

ONE_DEVICE = jax.devices()[:1]
TINY_RECIPE = {
    "data.demo.num_train": 200,
    "data.demo.num_validation": 8,
    "data.demo.num_test": 8,
    "data.max_length": 256,
    "model.hidden_size": 32,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.num_kv_heads": 1,
    "model.head_dim": 16,
    "model.intermediate_size": 64,
    "train.eval_every": 0,
    "train.log_every": 1,
    "checkpoint.every_steps": 1000,
    "mesh.data": 1,
}


def tiny_config(data_dir):
  config = experiment.get_config()
  config.recipe.update_from_flattened_dict({**TINY_RECIPE, "data.data_dir": str(data_dir)})
  config.update_from_flattened_dict(
      {
          "arms": "sft,cft:0.2,mix:0.2",
          "seeds": "0",
          "arm_steps": 2,
          "base.num_steps": 2,
          "base.num_problems": 64,
          "evaluation.num_test": 3,
          "evaluation.answer_max_new_tokens": 4,
          "evaluation.critique_max_new_tokens": 4,
          "evaluation.batch_size": 3,
      }
  )
  return config


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The stages share step shapes: compile once across train.run calls."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))


def params_of(workdir, config):
  model, _ = train.build_model(config)
  target = jax.eval_shape(lambda: nn.meta.unbox(train.init_params_fn(model, 0)()))
  return jax.device_get(ckpt.load_params(workdir, target))


def test_tiny_experiment_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
  config = tiny_config(tmp_path / "data")
  workdir = tmp_path / "experiment"
  initial_params = {}
  real_initial_params = train._initial_params

  def spy_initial_params(stage_config, *args):
    params = real_initial_params(stage_config, *args)
    initial_params[stage_config.name] = None if params is None else jax.device_get(params)
    return params

  monkeypatch.setattr(train, "_initial_params", spy_initial_params)
  paths = runner.run_experiment(config, workdir, ONE_DEVICE)

  assert sorted(p.name for p in paths) == ["accuracy.png", "loss_curves.png", "results.json", "results.md"]
  for png in ("accuracy.png", "loss_curves.png"):
    assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  results = json.loads((workdir / "results.json").read_text())
  assert [row["arm"] for row in results["rows"]] == ["base", "sft", "cft_f0.2", "mix_f0.2"]
  table = (workdir / "results.md").read_text()
  for arm in ("base", "sft", "cft_f0.2", "mix_f0.2"):
    assert f"| {arm} |" in table
  for row in results["rows"]:
    assert row["answer_accuracy"]["trials"] == 3 and row["critique_counts"]["n"] == 3
    assert row["self_critique_counts"]["n"] == 3

  # Every arm started from the base's final parameters (not a fresh init), and all arms
  # ran the same number of steps over the same token slots.
  base_params = params_of(workdir / "base", config.recipe)
  assert initial_params["experiment-base"] is None  # the base starts from the recipe's init
  arm_names = [name for name in initial_params if name != "experiment-base"]
  assert sorted(arm_names) == ["experiment-cft_f0.2-s0", "experiment-mix_f0.2-s0", "experiment-sft-s0"]
  for name in arm_names:
    jax.tree.map(np.testing.assert_array_equal, initial_params[name], base_params)
  trains = [row["train"][0] for row in results["rows"][1:]]
  budget = 2 * config.recipe.train.global_batch_size * 256  # steps x rows x length
  assert {t["token_budget"] for t in trains} == {budget} and {t["steps"] for t in trains} == {2}

  # A rerun skips every stage: no training, no generation; the same table comes out.
  def fail(*args, **kwargs):
    raise AssertionError("a finished stage ran again")

  monkeypatch.setattr(train, "run", fail)
  monkeypatch.setattr(evaluate, "load", fail)
  runner.run_experiment(config, workdir, ONE_DEVICE)
  assert json.loads((workdir / "results.json").read_text()) == results

  # A stage trained under another config is not silently reused.
  config.recipe.optim.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"trained with another config \(differs in optim.learning_rate\)"):
    runner.run_experiment(config, workdir, ONE_DEVICE)


def test_progress_names_the_stage_and_estimates_the_rest_from_timed_stages(monkeypatch):
  import io

  now = [0.0]
  monkeypatch.setattr(runner.time, "perf_counter", lambda: now[0])

  def takes(seconds, did_work=True):
    def work():
      now[0] += seconds
      return did_work

    return work

  out = io.StringIO()
  progress = runner.Progress(
      [("train", "base", 10), ("eval", "base", 1), ("train", "sft seed 0", 20), ("eval", "sft seed 0", 1)], stream=out
  )
  progress.run(0, takes(100.0))  # 10 steps in 100 s
  progress.run(1, takes(30.0))  # one evaluation in 30 s
  assert progress.eta_seconds() == (20 * 10.0 + 30.0, False)
  progress.run(2, takes(0.0, did_work=False))  # found finished: costs nothing, leaves the rates alone
  assert progress.eta_seconds() == (30.0, False)
  lines = out.getvalue().splitlines()
  assert "[experiment 1/4] train base (10 steps)" in lines[0] and "stages not yet timed" in lines[0]
  assert "[experiment 3/4] train sft seed 0 (20 steps)" in lines[2] and "ETA 3.8 min" in lines[2]
  assert lines[3].endswith("train sft seed 0: already finished, skipped")
