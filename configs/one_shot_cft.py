"""One-shot CFT: Qwen2.5-Math-7B trained on critiques of many sampled solutions to ONE problem.

The data comes from scripts/make_cft_data.py (see the README's "One-shot CFT" section):
one problem, many solutions sampled from one or more students, a teacher critique of each,
verdicts checked against the reference answer. The one-shot CFT paper (arXiv 2506.03295)
builds about 600 critiques per seed problem (10 models x 10 solutions, 7 teachers, filtered).

Model, precision and optimizer follow the CFT recipe (configs/qwen2_5_math_7b_cft.py). The
schedule here is a starting point for a few hundred rows, not the paper's numbers: several
epochs at a small batch, a checkpoint every 10 steps, and the step chosen afterwards by
MATH-500 accuracy (`eval.py --task=math --step=N` per kept step). One problem means one query, so prepare the data
with --validation_fraction=0: a held-out split would hold all rows or none.
"""

from configs import qwen2_5_math_7b_cft


def get_config():
  config = qwen2_5_math_7b_cft.get_config()
  config.name = "one_shot_cft"
  config.data.mixture = "one_shot_cft:1.0"
  config.data.num_epochs = 10
  config.train.global_batch_size = 64
  config.train.eval_every = 0  # no validation split (see above); select by MATH-500
  config.checkpoint.every_steps = 10
  config.checkpoint.keep = 20
  config.checkpoint.best_metric = ""
  return config
