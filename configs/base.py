"""Every config key cftjax reads, with its default and what it means.

Other config files start from `get_config()` here and change what they need; the command
line changes any key with `--config.a.b=value`. A key that does not exist is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "base"  # Free-form run name written to metrics and checkpoints.
  config.seed = 0  # Seeds parameter init and dropout-free training RNG.

  # ---------------------------------------------------------------- model
  model = config.model = ml_collections.ConfigDict()
  model.family = "llama"  # llama | mistral | qwen2: only changes export naming.
  model.vocab_size = 32000
  model.hidden_size = 4096  # Width of the residual stream (d_model).
  model.num_layers = 32
  model.num_heads = 32  # Query heads.
  model.num_kv_heads = 8  # Key/value heads (grouped-query attention; == num_heads for MHA).
  model.head_dim = 128  # Per-head width; usually hidden_size // num_heads.
  model.intermediate_size = 14336  # SwiGLU hidden width.
  model.rope_theta = 10000.0  # RoPE base frequency.
  # Llama 3.1 style RoPE rescaling: "" for none, or "llama3" with the fields below.
  model.rope_scaling_type = ""
  model.rope_scaling_factor = 8.0
  model.rope_low_freq_factor = 1.0
  model.rope_high_freq_factor = 4.0
  model.rope_original_max_position = 8192
  model.rms_norm_eps = 1e-5
  model.tie_embeddings = False  # Output head shares the input embedding matrix.
  model.qkv_bias = False  # Qwen2 puts biases on q, k and v projections.
  model.param_dtype = "float32"  # Master weights; optimizer math stays in this dtype.
  model.dtype = "float32"  # Compute dtype: "bfloat16" for real runs.
  model.scan_layers = True  # nn.scan over layers: compile time independent of depth.
  # Rematerialisation policy per layer: none | full | dots | dots_no_batch.
  model.remat_policy = "none"
  # xla | auto (splash on TPU where the length tiles, else xla) | cudnn (GPU flash
  # attention, bf16) | splash (TPU Pallas flash attention; the sequence length a multiple
  # of 128, and of 512 above 512; off TPU it runs in slow Pallas interpret mode). The
  # splash path is checked against xla in interpret mode only, not yet on a TPU: xla
  # stays the default until it is.
  model.attention_impl = "xla"
  # Sliding-window attention (Mistral): each token sees at most this many tokens, itself
  # included. 0 = all earlier tokens. Set by HF import from config.json.
  model.sliding_window = 0
  # Training loss over chunks of this many sequence positions (cftjax.head_loss): the
  # lm-head logits exist for [rows per device, chunk, vocab] at a time, forward and
  # backward, instead of the whole [rows, length, vocab] in float32. 0 = whole logits.
  model.loss_chunk_size = 256
  # Initialise from an existing model: "" (random init), a Hugging Face model directory
  # (config.json + safetensors) or a cftjax checkpoint directory.
  model.init_from = ""
  # Stddev of the random init of every weight matrix (HF's initializer_range).
  model.initializer_range = 0.02

  # ---------------------------------------------------------------- data
  data = config.data = ml_collections.ConfigDict()
  data.source = "demo"  # demo | tfds
  data.data_dir = "data_cache"  # Where prepared datasets and tokenizers live.
  # Tokenizer: "" = the one prepared with the data (demo); else a SentencePiece .model,
  # a tokenizer.json, or a model directory holding one.
  data.tokenizer = ""
  # model (the tokenizer's own Jinja chat template, rendered as transformers does; HF import
  # picks it when the model has one) | plain | qwen | llama3 (Llama 3 Instruct) | llama3_1
  # (Llama 3.1/3.3 Instruct: dated system block).
  data.chat_template = "plain"
  # System turn for every training and evaluation prompt; "" = the template's default (qwen
  # has one, the others none).
  data.system_prompt = ""
  data.max_length = 2048  # Tokens per packed row (and the truncation limit).
  # What to do with an example longer than max_length: drop | truncate_prompt_left |
  # truncate_target. Every drop or cut is counted in the metrics.
  data.truncation = "truncate_prompt_left"
  data.packing = True  # Pack several examples into one row (best-fit decreasing).
  # Examples the packer sorts and packs together. Larger packs tighter (only the window's
  # last rows stay part-empty) but holds more examples in memory and re-reads up to one
  # window on resume; beyond ~1024 the gain is small (README, "Benchmarks").
  data.packing_window = 1024
  data.shuffle_seed = 0
  data.num_epochs = 1  # Passes over the training data; the run stops when it is used up.
  data.worker_count = 0  # Grain multiprocess prefetch workers; 0 = in-process.
  data.worker_buffer_size = 2
  # Threads that read and tokenize records ahead (in each process or worker). Tokenizing
  # holds the GIL, so threads mainly hide storage latency (e.g. ArrayRecord on GCS); more
  # threads than that contend for the GIL and slow the pipeline down.
  data.read_threads = 4
  data.read_buffer_size = 64
  # Mixture: comma-separated "name:weight" entries, e.g. "webinstruct_cft:1,my_sft:0.5".
  # Each record says its own objective (cft or sft). For source=demo the names are
  # demo_cft / demo_sft / demo_drill (arithmetic practice). Metrics report loss per objective
  # and per source.
  data.mixture = "demo_cft:1.0"
  data.validation_split = "validation"
  # The embedded demo task (source=demo).
  demo = data.demo = ml_collections.ConfigDict()
  demo.seed = 1234
  demo.num_train = 20000
  demo.num_validation = 500
  demo.num_test = 500
  demo.min_steps = 3
  demo.max_steps = 5
  demo.error_fraction = 0.5  # Share of noisy responses that carry an injected error.
  demo.train_error_fraction = -1.0  # The train split's share when >= 0 (validation/test keep the above).
  demo.train_step_error_rate = 0.0  # > 0: wrong train responses have each step wrong with this probability.
  demo.flawed_critique_fraction = 0.2  # Share of deliberately flawed critiques.
  demo.vocab_size = 512  # SentencePiece vocabulary trained on the demo corpus.
  # Difficulty: values stay in [min_value, max_value) (10 and 100: every number two digits); start values in [2, max_start]; add and
  # subtract operands in [1, max_add_operand]; multipliers in [2, max_multiplier] (below 2:
  # none). Injected errors: "arithmetic" (a result off by one of arithmetic_slips) and/or
  # "operand" (an operand miscopied from the question), comma-separated.
  demo.min_value = 0
  demo.max_value = 1000
  demo.max_start = 60
  demo.max_add_operand = 30
  demo.max_multiplier = 9
  demo.error_kinds = "arithmetic,operand"
  demo.arithmetic_slips = "-10,-3,-2,-1,1,2,3,10"
  demo.drill_lines = 12  # Equations per demo_drill (arithmetic practice) record.
  demo.compare_per_problem = 4  # demo_compare (check practice) records per problem of a split.

  # ---------------------------------------------------------------- training
  train = config.train = ml_collections.ConfigDict()
  train.global_batch_size = 512  # Packed rows per optimizer step, over all hosts.
  train.grad_accum_steps = 1  # Micro-batches per step; must divide the per-device batch.
  # Each micro-batch's rows as this many independent forward/backward graphs in one step
  # (their gradients add up to the micro-batch's): XLA:CPU runs the two graphs' ops side by
  # side on its cores, each on half-size activations. 0 = auto: 2 on CPU where the
  # per-device micro-batch has an even number of rows, 1 elsewhere.
  train.row_groups = 0
  # Optimizer steps. -1 = derive from data.num_epochs and the token count of the data.
  train.num_steps = -1
  train.log_every = 10
  # A console progress bar (steps, rate, ETA) below the log lines; shown only when stdout
  # is a terminal, so piped and CI logs stay plain.
  train.progress_bar = True
  train.eval_every = 0  # Validation loss every N steps (0 = off).
  train.eval_batches = 4
  # Also a generation metric at each evaluation (greedy answer and critique accuracy on
  # this many demo validation problems; 0 = off). Usable with checkpoint.best_metric,
  # e.g. "val_critique_accuracy" with best_mode "max". The token limit below applies to
  # every in-training generation (demo and eval_math_data).
  train.eval_generation_examples = 0
  train.eval_generation_max_new_tokens = 384
  # Math benchmark accuracy at each evaluation, for any data source: comma-separated JSONL
  # files (question/answer rows, as scripts/eval.py --task=math reads), each logged as
  # val_<file stem>_accuracy (e.g. checkpoint.best_metric = "val_math500_accuracy", max).
  train.eval_math_data = ""
  train.eval_math_examples = 64  # First N problems of each file (0 = all).

  # ---------------------------------------------------------------- optimizer
  optim = config.optim = ml_collections.ConfigDict()
  optim.learning_rate = 5e-6  # Peak learning rate.
  optim.schedule = "cosine"  # cosine | linear | constant | wsd (after warmup)
  optim.decay_ratio = 0.2  # wsd: the final share of the post-warmup steps that decays.
  optim.warmup_ratio = 0.1  # Warmup as a fraction of num_steps (used if warmup_steps < 0).
  optim.warmup_steps = -1  # Explicit warmup steps; overrides warmup_ratio when >= 0.
  optim.end_lr_ratio = 0.0  # Final learning rate as a fraction of the peak.
  optim.weight_decay = 0.0  # AdamW decoupled weight decay (never on norms or biases).
  optim.b1 = 0.9
  optim.b2 = 0.95
  optim.eps = 1e-8
  optim.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.

  # ---------------------------------------------------------------- mesh / sharding
  mesh = config.mesh = ml_collections.ConfigDict()
  # Devices per named axis; one axis may be -1 to take the remaining devices.
  mesh.data = -1  # Pure data parallelism (replicated params).
  mesh.fsdp = 1  # Parameters and optimizer state sharded, batch split too.
  mesh.tensor = 1  # Heads / MLP / vocab split (Megatron-style).

  # ---------------------------------------------------------------- checkpointing
  checkpoint = config.checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = 100  # Save every N steps (and always at the end).
  checkpoint.keep = 3  # Keep the newest K checkpoints.
  # Also keep the best K by this metric ("" = off); e.g. "val_loss" (lower is better).
  checkpoint.best_metric = ""
  checkpoint.best_mode = "min"  # min | max
  checkpoint.keep_best = 1
  checkpoint.async_save = True

  return config
