"""Arm and base configs: derived purely from the experiment config, differing only where allowed."""

import itertools

import pytest

from cftjax.experiment import arms
from configs import experiment

TOKENIZER = "data_cache/demo-x/tokenizer.model"
BASE = "runs/experiment/base"


def all_arm_configs(config):
  return {
      (arm.name, seed): arms.arm_config(config.recipe, arm, seed, BASE, TOKENIZER, config.arm_steps)
      for arm in arms.parse_arms(config.arms)
      for seed in arms.parse_seeds(config.seeds)
  }


def test_default_experiment_has_the_issues_arms_and_two_seeds():
  config = experiment.get_config()
  assert [a.name for a in arms.parse_arms(config.arms)] == ["sft", "cft_f0", "cft_f0.2", "cft_f0.4", "mix_f0.2"]
  # Five arms of the demo's length, twice, fit 60 minutes on 2 cores (README); "0" halves the arms.
  assert arms.parse_seeds(config.seeds) == [0, 1] and arms.parse_seeds("0") == [0]


def test_arms_differ_only_in_data_objective_and_seed_keys():
  configs = all_arm_configs(experiment.get_config())
  for (a, config_a), (b, config_b) in itertools.combinations(configs.items(), 2):
    changed = arms.differing_keys(config_a, config_b)
    assert changed <= set(arms.ARM_KEYS), (a, b, changed - set(arms.ARM_KEYS))
  by_arm = {key[0]: c for key, c in configs.items() if key[1] == 0}
  assert by_arm["sft"].data.mixture == "demo_sft:0.3,demo_compare:0.7"
  assert by_arm["cft_f0"].data.mixture == "demo_cft:0.3,demo_compare:0.7"
  assert [by_arm[n].data.demo.flawed_critique_fraction for n in ("cft_f0", "cft_f0.2", "cft_f0.4")] == [0.0, 0.2, 0.4]
  assert by_arm["mix_f0.2"].data.mixture == "demo_cft:0.15,demo_sft:0.15,demo_compare:0.7"


@pytest.mark.parametrize(
    "recipe_mixture, kind, expected",
    [
        ("demo_cft:1", "sft", "demo_sft:1"),
        ("demo_cft:1", "mix", "demo_cft:0.5,demo_sft:0.5"),
        ("demo_cft:0.6,demo_drill:0.2,demo_compare:0.2", "sft", "demo_sft:0.6,demo_drill:0.2,demo_compare:0.2"),
        ("demo_compare:1", "cft", "demo_cft:1,demo_compare:1"),  # no objective records: weight 1
    ],
)
def test_an_arm_replaces_the_recipes_objective_records_and_keeps_its_practice(recipe_mixture, kind, expected):
  assert arms.ArmSpec(kind, None if kind == "sft" else 0.2).mixture(recipe_mixture) == expected


def test_arms_share_one_base_one_tokenizer_and_one_token_budget():
  config = experiment.get_config()
  configs = all_arm_configs(config).values()
  assert {c.model.init_from for c in configs} == {BASE}
  assert {c.data.tokenizer for c in configs} == {TOKENIZER}  # one vocabulary for base and arms
  budgets = {arms.token_budget(c) for c in configs}
  assert budgets == {config.arm_steps * config.recipe.train.global_batch_size * config.recipe.data.max_length}
  # Same schedule: every optimizer and train key equal (num_steps included).
  for c in configs:
    assert c.optim.to_dict() == config.recipe.optim.to_dict()
    assert c.train.num_steps == config.arm_steps


def test_stages_follow_the_recipe():
  """Model, optimizer and batch come from the recipe, so a demo change reaches every stage."""
  config = experiment.get_config()
  config.recipe.model.hidden_size = 96
  config.recipe.optim.learning_rate = 1e-3
  base = arms.base_config(config.recipe, TOKENIZER, "runs/x/base_data", "experiment_base", 7)
  arm = all_arm_configs(config)[("cft_f0.2", 0)]
  for stage in (base, arm):
    assert stage.model.hidden_size == 96 and stage.optim.learning_rate == 1e-3
  assert arms.differing_keys(config.recipe, base) <= {
      "name",
      "data.source",
      "data.data_dir",
      "data.mixture",
      "data.tokenizer",
      "train.num_steps",
      "train.eval_generation_examples",
      "checkpoint.best_metric",
  }
  assert base.model.init_from == config.recipe.model.init_from


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sft,cft", "needs a flawed-critique fraction"),
        ("sft:0.2", "no flawed fraction"),
        ("rl:0.1", "is not one of"),
        ("cft:1.5", "must be in"),
        ("cft:0.2,cft:0.2", "names an arm twice"),
        ("", "is empty"),
    ],
)
def test_bad_arm_specs_fail_naming_the_key(spec, message):
  with pytest.raises(ValueError, match=f"config key arms.*{message}|{message}"):
    arms.parse_arms(spec)


def test_bad_seeds_fail_naming_the_key():
  for spec in ("", "0,0", "a"):
    with pytest.raises(ValueError, match="config key seeds"):
      arms.parse_seeds(spec)
