"""The embedded demo: a ~1.8M-parameter Llama-style model learns to critique multi-step
arithmetic (CFT) on a 2-core CPU in a few minutes. The default of scripts/train.py."""

from configs import base


def get_config():
  config = base.get_config()
  config.name = "demo"

  model = config.model
  model.family = "llama"
  model.vocab_size = 512  # == data.demo.vocab_size: the tokenizer trained on the demo corpus
  model.hidden_size = 192
  model.num_layers = 4
  model.num_heads = 3
  model.num_kv_heads = 1
  model.head_dim = 64
  model.intermediate_size = 512
  model.rope_theta = 10000.0
  model.tie_embeddings = False

  data = config.data
  data.source = "demo"
  data.mixture = "demo_cft:1.0"
  data.chat_template = "plain"
  data.max_length = 512
  data.demo.num_train = 20000

  train = config.train
  train.global_batch_size = 4
  train.num_steps = 150
  train.log_every = 10
  train.eval_every = 50
  train.eval_batches = 2

  optim = config.optim
  optim.learning_rate = 3e-3
  optim.warmup_steps = 10
  optim.schedule = "cosine"
  optim.end_lr_ratio = 0.1
  optim.weight_decay = 0.01
  optim.b2 = 0.98

  config.checkpoint.every_steps = 50
  config.checkpoint.keep = 2
  return config
