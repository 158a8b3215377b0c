"""The embedded experiment (scripts/experiment.py): the CFT paper in miniature.

Every stage trains the recipe (configs/demo.py: model, optimizer, batch, schedule) and
changes only its data and length, so the experiment follows the demo when the demo
changes. Scale it with the same command, e.g. a larger model on an accelerator:
  --config.recipe.model.hidden_size=512 --config.recipe.train.global_batch_size=64 ...
Defaults are sized to finish within 60 minutes on 2 CPU cores.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.recipe = demo.get_config()  # what every stage trains; override any key under recipe.
  # The demo's three-step problems number 5,832 (5,249 train-split): the arms train on the
  # first 2,500 train problems, the base on the next 2,500.
  config.recipe.data.demo.num_train = 2500
  # SFT records are short (~60 tokens), so the sft arm reads ~25 a step: 300 steps need ~3
  # passes over its 2,500 problems (a stage that runs out of data stops the experiment).
  config.recipe.data.num_epochs = 6

  # Arms: "sft" (correct solutions), "cft:F" (critiques, a share F of them flawed),
  # "mix:F" (CFT + SFT records of the same problems, 1:1).
  config.arms = "sft,cft:0,cft:0.2,cft:0.4,mix:0.2"
  config.seeds = "0,1"  # each arm runs once per seed (data order and RNG); "0" halves the arms
  # Every arm: the demo's rows x length and schedule, for as many steps as the demo trains from
  # scratch (the arms start from the base, which already compares). Five arms of 300 steps, two
  # seeds each, keep the experiment within 60 minutes on 2 cores (28 min measured on
  # 2026-12-05, 48 min on a slower machine with the previous step; README).
  config.arm_steps = 300

  # The base every arm starts from: SFT on partly noisy solutions to problems no arm sees.
  base = config.base = ml_collections.ConfigDict()
  base.num_problems = 2500
  base.error_fraction = 0.3  # share of its training solutions holding one error
  base.num_steps = 200
  # Check-practice lines per base problem (the arms practise at the recipe's share too).
  base.practice_per_problem = 3

  evaluation = config.evaluation = ml_collections.ConfigDict()
  evaluation.num_test = 200  # held-out test problems (the demo's test split), the same for every arm
  evaluation.answer_max_new_tokens = 48  # a demo solution is at most 32 tokens
  evaluation.critique_max_new_tokens = 128  # a demo critique is at most ~95 tokens
  evaluation.batch_size = 200  # prompts per generation batch
  return config
