"""Benchmark: cftjax's train step side by side with transformers + torch, and on a GPU.

  python scripts/bench_train.py [--shapes=demo,45m,110m] [--steps=8] [--warmup=2]
      [--batch=4] [--length=512] [--scan_layers] [--cpu_devices=1] [--row_groups=0] [--out=FILE.json]
  python scripts/bench_train.py --config=gpu_1b [--batch=8] [--length=2048]   # or --gpu

CPU (the default): for each shape two worker processes are started, one running cftjax's
jitted train step (cftjax.train.compile_steps: float32, AdamW with global-norm clipping
from cftjax.optim, the state donated, the batch copied from the host each step, its rows
in train.row_groups' default groups: all as in training) and one running transformers'
LlamaForCausalLM with torch.optim.AdamW and clip_grad_norm_, on the same Llama shape and
the same random batch of `--batch` x `--length` tokens. Their steps alternate one by one
(so a busy machine slows both alike); after `--warmup` steps each, the median of `--steps`
steps is reported, with the ratio cftjax / torch in tokens/s. "GFLOP/s" is the step's
model FLOPs (6 N per token plus causal attention, cftjax.metrics.train_flops_per_token)
over its median time; "matmul GFLOP/s" is what the same processes reach on bare [B*L, in]
x [in, out] matmuls of the step's projection shapes (their FLOP-weighted rate): the
ceiling the step would run at if it were nothing but its matmuls.

GPU (--config=gpu_1b): cftjax alone trains a ~1.2B Llama-3.2-1B-shaped model (bfloat16
compute, float32 master weights, cuDNN attention, `--length` 2048) and reports tokens/s
and MFU against the device's peak (cftjax.metrics.PEAK_FLOPS).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_SHAPES = flags.DEFINE_list("shapes", ["demo", "45m", "110m"], "Model shapes to run (CPU).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per side (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per side first (compilation, caches).")
_BATCH = flags.DEFINE_integer("batch", 0, "Rows per step (0: 4 on CPU, 8 for gpu_1b).")
_LENGTH = flags.DEFINE_integer("length", 0, "Tokens per row (0: 512 on CPU, 2048 for gpu_1b).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    1,
    "CPU: host devices cftjax's step is data-parallel over (its worker runs with "
    "XLA_FLAGS=--xla_force_host_platform_device_count=N; the batch splits N ways).",
)
_ROW_GROUPS = flags.DEFINE_integer(
    "row_groups",
    0,
    "cftjax's train.row_groups: rows per step as this many independent graphs (0 = auto, as "
    "training resolves it: 2 on CPU for an even batch per device, else 1).",
)
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers",
    False,
    "cftjax's model.scan_layers. CPU default: unrolled, as configs/demo.py runs its model on CPU "
    "(the scan's stacked buffers cost the demo shape ~20%); gpu_1b scans unless this flag is given.",
)
_KEEP_STEP_MEMORY = flags.DEFINE_bool(
    "keep_step_memory",
    True,
    "cftjax keeps its step's freed scratch memory for the next step, as scripts/train.py does (cftjax.host_memory).",
)
_MATMUL = flags.DEFINE_bool("matmul", True, "Also measure bare-matmul GFLOP/s of the step's shapes.")
_CONFIG = flags.DEFINE_enum(
    "config",
    "cpu",
    ["cpu", "gpu_1b"],
    "cpu: side by side with torch; " "gpu_1b: cftjax alone, ~1B model in bf16 on the accelerator.",
)
_GPU = flags.DEFINE_bool("gpu", False, "Same as --config=gpu_1b.")
_REMAT = flags.DEFINE_string(
    "remat_policy", "", "cftjax model.remat_policy (default: none on CPU, " "dots_no_batch for gpu_1b)."
)
_ATTENTION = flags.DEFINE_string(
    "attention_impl", "", "cftjax model.attention_impl (default: xla " "on CPU, cudnn for gpu_1b)."
)
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")
_WORKER = flags.DEFINE_enum("worker", "", ["", "jax", "torch"], "Internal: run one side's worker.")
_SHAPE = flags.DEFINE_string("shape", "", "Internal: the worker's shape.")

# Llama shapes (untied head, SwiGLU, grouped-query attention, head_dim 64 unless given).
SHAPES = {
    "demo": dict(
        vocab_size=512, hidden_size=192, num_layers=4, num_heads=3, num_kv_heads=1, head_dim=64, intermediate_size=512
    ),
    "45m": dict(
        vocab_size=32000,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=1536,
    ),
    "110m": dict(
        vocab_size=32000,
        hidden_size=768,
        num_layers=10,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=2048,
    ),
    # Llama 3.2 1B: tied embeddings, 1.24B parameters.
    "gpu_1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        tie_embeddings=True,
        rope_theta=500000.0,
    ),
}
OPTIM = dict(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0)


def random_batch(shape: dict, batch: int, length: int, seed: int = 0) -> dict:
  import numpy as np

  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, shape["vocab_size"], (batch, length + 1), dtype=np.int32)
  ones = np.ones((batch, length), np.int32)
  from cftjax.data.batch import TokenBatch

  return TokenBatch(
      inputs=tokens[:, :-1].copy(),
      targets=tokens[:, 1:].copy(),
      positions=np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
      segment_ids=ones,
      weights=ones.astype(np.float32),
      objective_ids=np.zeros_like(ones),
      source_ids=np.zeros_like(ones),
  )


def matmul_shapes(shape: dict, tokens: int) -> list[tuple[int, int, int]]:
  """(rows, in, out) of the step's projections, once per layer (lm head once)."""
  d, q, kv = shape["hidden_size"], shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
  f = shape["intermediate_size"]
  layer = [
      (tokens, d, q),
      (tokens, d, kv),
      (tokens, d, kv),
      (tokens, q, d),
      (tokens, d, f),
      (tokens, d, f),
      (tokens, f, d),
  ]
  return layer * shape["num_layers"] + [(tokens, d, shape["vocab_size"])]


def model_config(shape_name: str, **overrides):
  from cftjax.model import ModelConfig

  return ModelConfig(**{**SHAPES[shape_name], **overrides})


# ------------------------------------------------------------------------------ workers
class JaxSide:
  """cftjax's compiled train step, data-parallel over `devices` devices, state donated, batch
  copied per step."""

  def __init__(
      self, shape_name: str, batch: int, length: int, devices: int = 1, row_groups: int = 0, **model_overrides
  ):
    import jax
    import ml_collections
    import numpy as np

    from cftjax import optim, sharding, train
    from cftjax.model import Transformer

    self.jax, self.np = jax, np
    config = model_config(shape_name, **model_overrides)
    self.model_config = config
    self.num_params = config.num_params()
    model = Transformer(config)
    optim_config = ml_collections.ConfigDict(
        dict(OPTIM, schedule="constant", warmup_steps=0, warmup_ratio=0.0, end_lr_ratio=1.0)
    )
    tx, schedule = optim.make_optimizer(optim_config, num_steps=1000)
    if len(jax.devices()) < devices:
      raise SystemExit(f"--cpu_devices={devices}: jax sees {len(jax.devices())} devices")
    mesh_config = ml_collections.ConfigDict(dict(data=devices, fsdp=1, tensor=1))
    self.mesh = sharding.make_mesh(mesh_config, jax.devices()[:devices])
    layout = train.state_layout(model, tx, self.mesh, seed=0)
    run_config = ml_collections.ConfigDict(
        dict(train=dict(global_batch_size=batch, row_groups=row_groups), mesh=dict(mesh_config))
    )
    self.row_groups = train.resolve_row_groups(run_config, self.mesh, accum=1)
    self.steps = train.compile_steps(model, tx, schedule, self.mesh, layout, 1, 1, self.row_groups)
    self.state = train.init_state(model, tx, self.mesh, 0, layout)
    self.host_batch = random_batch(SHAPES[shape_name], batch, length)
    self.sharding = sharding

  def step(self) -> float:
    start = time.perf_counter()
    batch = self.sharding.host_batch_to_global(self.host_batch, self.mesh)
    self.state, metrics = self.steps.train(self.state, batch)
    loss = float(metrics["loss"])  # waits for the step
    elapsed = time.perf_counter() - start
    if not self.np.isfinite(loss):
      raise FloatingPointError(f"cftjax loss is {loss}")
    return elapsed

  def matmul_rate(self, shapes, repeats: int = 3) -> float:
    jax, jnp = self.jax, self.jax.numpy
    matmul = jax.jit(jnp.matmul)
    flops = seconds = 0.0
    for rows, k, n in sorted(set(shapes)):
      a = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32)
      b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
      matmul(a, b).block_until_ready()
      best = min(_seconds(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
      count = shapes.count((rows, k, n))
      flops += count * 2 * rows * k * n
      seconds += count * best
    return flops / seconds


class TorchSide:
  """transformers' LlamaForCausalLM, torch AdamW with the same hyperparameters and clipping."""

  def __init__(self, shape_name: str, batch: int, length: int):
    import torch
    import transformers

    shape = SHAPES[shape_name]
    self.torch = torch
    hf_config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=max(length, 2048),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    self.model = transformers.LlamaForCausalLM(hf_config).train()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(),
        lr=OPTIM["learning_rate"],
        betas=(OPTIM["b1"], OPTIM["b2"]),
        eps=OPTIM["eps"],
        weight_decay=OPTIM["weight_decay"],
    )
    host = random_batch(shape, batch, length)
    self.inputs = torch.from_numpy(host.inputs).long()
    self.targets = torch.from_numpy(host.targets).long()

  def step(self) -> float:
    torch = self.torch
    start = time.perf_counter()
    logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM["grad_clip_norm"])
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    elapsed = time.perf_counter() - start
    if value != value:
      raise FloatingPointError(f"torch loss is {value}")
    return elapsed

  def matmul_rate(self, shapes, repeats: int = 3) -> float:
    torch = self.torch
    flops = seconds = 0.0
    with torch.no_grad():
      for rows, k, n in sorted(set(shapes)):
        a, b = torch.randn(rows, k), torch.randn(k, n)
        a @ b
        best = min(_seconds(lambda: a @ b) for _ in range(repeats))
        count = shapes.count((rows, k, n))
        flops += count * 2 * rows * k * n
        seconds += count * best
    return flops / seconds


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def serve(side) -> None:
  """Worker loop: one JSON command per stdin line, one JSON answer per stdout line."""
  answer = sys.stdout
  sys.stdout = sys.stderr  # library prints must not corrupt the protocol
  print(json.dumps({"ready": True, "params": side.num_params}), file=answer, flush=True)
  for line in sys.stdin:
    command = json.loads(line)
    if command["do"] == "step":
      reply = {"seconds": side.step()}
    elif command["do"] == "matmul":
      reply = {"flops_per_s": side.matmul_rate([tuple(s) for s in command["shapes"]])}
    else:
      return
    print(json.dumps(reply), file=answer, flush=True)


class Worker:

  def __init__(self, side: str, shape: str, batch: int, length: int):
    args = [
        sys.executable,
        __file__,
        f"--worker={side}",
        f"--shape={shape}",
        f"--batch={batch}",
        f"--length={length}",
        f"--scan_layers={_SCAN_LAYERS.value}",
        f"--cpu_devices={_CPU_DEVICES.value}",
        f"--row_groups={_ROW_GROUPS.value}",
        f"--keep_step_memory={_KEEP_STEP_MEMORY.value}",
    ]
    if _REMAT.value:
      args.append(f"--remat_policy={_REMAT.value}")
    if _ATTENTION.value:
      args.append(f"--attention_impl={_ATTENTION.value}")
    env = dict(os.environ)
    if side == "jax" and _CPU_DEVICES.value > 1:
      count = f"--xla_force_host_platform_device_count={_CPU_DEVICES.value}"
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {count}".strip()
    self.name = side
    self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.ask_reply = None

  def send(self, **command) -> None:
    self.process.stdin.write(json.dumps(command) + "\n")
    self.process.stdin.flush()

  def receive(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.name} worker exited with {self.process.wait()}")
    return json.loads(line)

  def ask(self, **command) -> dict:
    self.send(**command)
    return self.receive()

  def close(self) -> None:
    if self.process.poll() is None:
      self.send(do="quit")
      self.process.wait()


def side_by_side(shape_name: str, batch: int, length: int, steps: int, warmup: int) -> dict:
  from cftjax import metrics

  workers = [Worker("jax", shape_name, batch, length), Worker("torch", shape_name, batch, length)]
  try:
    # Ready: built, sequentially so neither build slows the other's steps.
    params = {w.name: w.receive()["params"] for w in workers}
    if len(set(params.values())) != 1:
      raise RuntimeError(f"shape {shape_name!r}: the two sides built different models, parameters {params}")
    times = {w.name: [] for w in workers}
    for i in range(warmup + steps):
      for w in workers:
        seconds = w.ask(do="step")["seconds"]
        if i >= warmup:
          times[w.name].append(seconds)
    rates = {}
    if _MATMUL.value:
      shapes = matmul_shapes(SHAPES[shape_name], batch * length)
      for w in workers:
        rates[w.name] = w.ask(do="matmul", shapes=shapes)["flops_per_s"]
  finally:
    for w in workers:
      w.close()
  config = model_config(shape_name)
  step_flops = metrics.train_flops_per_token(config, length) * batch * length
  row = dict(
      shape=shape_name,
      params=config.num_params(),
      batch=batch,
      length=length,
      scan_layers=_SCAN_LAYERS.value,
      row_groups=_ROW_GROUPS.value,
      cpu_devices=_CPU_DEVICES.value,
      keep_step_memory=_KEEP_STEP_MEMORY.value,
      steps=steps,
  )
  for name, t in times.items():
    median = statistics.median(t)
    row[f"{name}_step_s"] = median
    row[f"{name}_tokens_per_s"] = batch * length / median
    row[f"{name}_gflops"] = step_flops / median / 1e9
    if name in rates:
      row[f"{name}_matmul_gflops"] = rates[name] / 1e9
  row["ratio"] = row["jax_tokens_per_s"] / row["torch_tokens_per_s"]
  return row


def print_row(row: dict) -> None:
  matmul = lambda side: f"{row[f'{side}_matmul_gflops']:7.1f}" if f"{side}_matmul_gflops" in row else "      -"
  print(
      f"{row['shape']:>5} {row['params'] / 1e6:6.1f}M | {row['jax_tokens_per_s']:9.0f} "
      f"{row['jax_gflops']:7.1f} {matmul('jax')} | {row['torch_tokens_per_s']:9.0f} "
      f"{row['torch_gflops']:7.1f} {matmul('torch')} | {row['ratio']:5.2f}",
      flush=True,
  )


def gpu_benchmark(batch: int, length: int, steps: int, warmup: int) -> dict:
  import jax

  from cftjax import metrics

  overrides = dict(
      dtype="bfloat16",
      param_dtype="float32",
      scan_layers=_SCAN_LAYERS.value if flags.FLAGS["scan_layers"].present else True,
      attention_impl=_ATTENTION.value or "cudnn",
      remat_policy=_REMAT.value or "dots_no_batch",
  )
  side = JaxSide("gpu_1b", batch, length, **overrides)
  config = side.model_config
  for _ in range(warmup):
    side.step()
  times = [side.step() for _ in range(steps)]
  median = statistics.median(times)
  tokens_per_s = batch * length / median
  flops_per_token = metrics.train_flops_per_token(config, length)
  mfu = metrics.mfu(tokens_per_s, flops_per_token, 1)
  row = dict(
      shape="gpu_1b",
      device=jax.devices()[0].device_kind,
      params=config.num_params(),
      batch=batch,
      length=length,
      step_s=median,
      tokens_per_s=tokens_per_s,
      tflops=tokens_per_s * flops_per_token / 1e12,
      mfu=mfu,
      **overrides,
  )
  print(
      f"{row['device']}: {config.num_params() / 1e9:.2f}B params, batch {batch} x {length}, "
      f"{overrides}: step {median:.3f} s, {tokens_per_s:,.0f} tokens/s, "
      f"{row['tflops']:.1f} TFLOP/s, MFU " + (f"{mfu:.1%}" if mfu is not None else "n/a (unknown peak)")
  )
  return row


def main(argv):
  del argv
  gpu = _GPU.value or _CONFIG.value == "gpu_1b"
  batch = _BATCH.value or (8 if gpu else 4)
  length = _LENGTH.value or (2048 if gpu else 512)
  if _WORKER.value:
    if _WORKER.value == "jax":
      overrides = dict(scan_layers=_SCAN_LAYERS.value)
      if _REMAT.value:
        overrides["remat_policy"] = _REMAT.value
      if _ATTENTION.value:
        overrides["attention_impl"] = _ATTENTION.value
      if _KEEP_STEP_MEMORY.value:
        from cftjax import host_memory

        host_memory.keep_step_memory()
      serve(JaxSide(_SHAPE.value, batch, length, _CPU_DEVICES.value, _ROW_GROUPS.value, **overrides))
    else:
      serve(TorchSide(_SHAPE.value, batch, length))
    return
  if gpu:
    import jax

    if jax.default_backend() != "gpu":
      raise SystemExit(f"--config=gpu_1b needs a GPU; jax's backend here is {jax.default_backend()!r}")
    results = [gpu_benchmark(batch, length, _STEPS.value, _WARMUP.value)]
  else:
    import torch

    for name in _SHAPES.value:
      if name not in SHAPES or name == "gpu_1b":
        raise ValueError(f"--shapes: unknown CPU shape {name!r}; choose from demo, 45m, 110m")
    print(
        f"batch {batch} x {length}, median of {_STEPS.value} steps after {_WARMUP.value}, steps "
        f"alternating; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"scan_layers={_SCAN_LAYERS.value}; cftjax on {_CPU_DEVICES.value} CPU device(s), "
        f"row_groups={_ROW_GROUPS.value or 'auto'}, keep_step_memory={_KEEP_STEP_MEMORY.value}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'shape':>5} {'params':>7} | {'cftjax tok/s':>9} {'GFLOP/s':>7} {'matmul':>7} | "
        f"{'torch tok/s':>9} {'GFLOP/s':>7} {'matmul':>7} | ratio"
    )
    results = []
    for name in _SHAPES.value:
      results.append(side_by_side(name, batch, length, _STEPS.value, _WARMUP.value))
      print_row(results[-1])
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
  if _OUT.value:
    Path(_OUT.value).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
