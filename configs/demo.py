"""The embedded demo: a ~2M-parameter Llama-style model trained to critique multi-step
arithmetic (CFT) on a 2-core CPU in about 5 minutes. The default of scripts/train.py.

Single-digit values (0-9), +/- only, exactly three steps: every query, solution line and
check line has the same token layout, so a critique finds what it checks at fixed offsets
(with two-digit values and 2-3 steps the model did not even copy the response's lines in
450 steps). Errors are slips of 1 or 2. Six full (not grouped) heads: with one shared
key/value head the model never learned to copy the response.

Training responses are wrong more often than test ones and in several steps, mostly by slips
of a result (`train_error_fraction`, `train_step_error_rate`): a written result whose line
starts as the critic's own does is then often wrong, so copying it does not pay. Check
practice (`demo_compare`: "Check 9 - 4, written 4." -> "Check: 9 - 4 = 5, written 4:
wrong.") is 70% of the records: the verdict compares two numbers, which this model learns
only from many clean comparisons per step. 16 rows of 256 tokens (a
critique and its practice lines each) hold ~80 checks a step, where 4 x 512 held ~51 and
the comparison was learned by step 600 in two runs of three; attention over 256-token rows
also costs a quarter less per token. Weights start at stddev 0.08, not the usual 0.02: with
0.02 the verdict's loss sat at chance until step ~250-400 (600 steps were needed), with 0.08
the comparison is learned by step ~200 and 300 steps suffice.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.name = "demo"

  model = config.model
  model.family = "llama"
  model.vocab_size = 512  # == data.demo.vocab_size: the tokenizer trained on the demo corpus
  model.hidden_size = 192
  model.num_layers = 4
  model.num_heads = 6
  model.num_kv_heads = 6
  model.head_dim = 32
  model.intermediate_size = 512
  model.rope_theta = 10000.0
  model.tie_embeddings = False
  model.scan_layers = False  # 4 layers compile fast unrolled, and the step runs ~6% faster
  # A 2M model from scratch: larger initial weights make attention's fixed-offset lookups (the
  # critic's line beside the written one) sharp sooner; 0.05 reached 0.89 in 300 steps, 0.08 0.96.
  model.initializer_range = 0.08

  data = config.data
  data.source = "demo"
  data.mixture = "demo_cft:0.3,demo_compare:0.7"
  data.chat_template = "plain"
  data.max_length = 256  # a critique record is ~130-150 tokens: one to a row, with practice lines
  data.num_epochs = 3  # the run stops at train.num_steps first
  demo = data.demo
  # 5,832 problems exist (8 starts x 9^3 operation sequences); 90% of them are train.
  demo.num_train, demo.num_validation, demo.num_test = 5000, 200, 250
  demo.min_value, demo.max_value, demo.max_start = 0, 10, 9
  demo.max_add_operand, demo.max_multiplier = 9, 0
  demo.error_kinds, demo.arithmetic_slips = "arithmetic,operand,carried", "-2,-1,1,2"
  demo.min_steps, demo.max_steps = 3, 3
  # 90% of train responses wrong, each step with probability 0.7 (at least one): a written
  # result whose line starts as the critic's own does is wrong 36% of the time, a response's
  # operand differs from the query's in 10% of lines. Validation and test keep single-error
  # responses, half of them wrong.
  demo.train_error_fraction, demo.train_step_error_rate = 0.9, 0.7

  train = config.train
  train.global_batch_size = 16
  # With initializer_range 0.02 the check-practice comparison was learned anywhere from step
  # 250 to past 400 (600 steps were the default); with 0.08 validation loss is 0.027 at step 200.
  train.num_steps = 300
  train.log_every = 10
  train.eval_every = 100
  train.eval_batches = 2

  optim = config.optim
  optim.learning_rate = 2e-3
  optim.warmup_steps = 10
  optim.schedule = "cosine"
  optim.end_lr_ratio = 0.1
  optim.weight_decay = 0.01
  optim.b2 = 0.98

  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  return config
