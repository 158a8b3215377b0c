"""Train state, the jitted (sharded) train and eval steps, and the training loop."""

import dataclasses
import functools
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cftjax import checkpoint as ckpt
from cftjax import metrics as metrics_lib
from cftjax import files, head_loss, objectives, optim, sharding
from cftjax.evaluators import EvalContext
from cftjax.data import pipeline
from cftjax.data.batch import TokenBatch
from cftjax.data import sources as sources_lib
from cftjax.data import tokenizer as tokenizer_lib
from cftjax import model as model_lib
from cftjax.model import ModelConfig, Transformer

PER_SOURCE_KEYS = ("loss_by_source", "tokens_by_source")  # arrays over data.mixture's sources


class TrainingStopped(RuntimeError):
  """A NaN/Inf loss or a signal ended the run; the message says what was kept."""


# ------------------------------------------------------------------------------ state
init_params_fn = model_lib.params_init_fn


@dataclasses.dataclass(frozen=True)
class StateLayout:
  abstract: Any  # ShapeDtypeStructs with shardings
  shardings: Any


def state_layout(model: Transformer, tx: optax.GradientTransformation, mesh, seed: int) -> StateLayout:
  abstract_params, param_shardings = sharding.abstract_params_and_shardings(init_params_fn(model, seed), mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding.shardings_like_params(abstract_opt, abstract_params, param_shardings, mesh)
  replicated = NamedSharding(mesh, P())
  shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt}
  abstract = sharding.with_shardings(abstract, shardings)
  return StateLayout(abstract, shardings)


def init_state(model, tx, mesh, seed: int, layout: StateLayout, params=None):
  """Creates the train state directly in its sharded layout (never whole on one host)."""
  make_params = init_params_fn(model, seed)

  def create(params):
    if params is None:
      params = nn.meta.unbox(make_params())
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  if params is None:
    return jax.jit(lambda: create(None), out_shardings=layout.shardings)()
  return jax.jit(create, in_shardings=(layout.shardings["params"],), out_shardings=layout.shardings)(params)


# ------------------------------------------------------------------------------ steps
def _forward_sums(model, params, batch, num_sources: int):
  inputs = (batch.inputs, batch.positions, batch.segment_ids)
  cfg = model.config
  if cfg.loss_chunk_size:  # never the whole [B, L, V] logits
    hidden, _ = model.apply({"params": params}, *inputs, return_hidden=True)
    ce = head_loss.chunked_token_cross_entropy(
        hidden, head_loss.head_kernel(params, cfg.tie_embeddings), batch.targets, cfg.loss_chunk_size, cfg.jnp_dtype
    )
  else:
    logits, _ = model.apply({"params": params}, *inputs)
    ce = objectives.token_cross_entropy(logits, batch.targets)
  return objectives.token_loss_sums(ce, batch.weights, batch.objective_ids, batch.source_ids, num_sources)


def _split_micro_batches(batch, accum: int):
  """[B, L] -> [A, B/A, L], taking rows i*A + a for micro-batch a.

  With rows sharded in contiguous blocks over devices, each device's micro-batch rows
  are its own rows, so splitting moves no data.
  """

  def split(x):
    rows = x.shape[0]
    return x.reshape((rows // accum, accum) + x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def _grads_by_row_groups(grad_fn, params, batch, row_groups: int):
  """grad_fn(params, batch) as the sum over `row_groups` groups of its rows, each group its
  own forward and backward graph.

  The loss is a sum over tokens (divided by a constant), so the groups' values and
  gradients add up to the whole batch's. XLA:CPU's executor runs independent ops side by
  side, and each group's activations are half the size, so more of each pass stays in
  cache (the demo step ~6% faster with two groups; README). Rows are taken as in
  `_split_micro_batches`, so a device's groups are made of its own rows.
  """
  if row_groups == 1:
    return grad_fn(params, batch)
  groups = _split_micro_batches(batch, row_groups)
  results = [grad_fn(params, jax.tree.map(lambda x, g=g: x[g], groups)) for g in range(row_groups)]
  return jax.tree.map(lambda *parts: functools.reduce(jnp.add, parts), *results)


def train_step(state, batch, *, model, tx, schedule, accum: int, num_sources: int, row_groups: int = 1):
  """One optimizer step; the loss is a token mean over the whole global batch."""
  total_weight = jnp.maximum(jnp.sum(batch.weights.astype(jnp.float32)), 1.0)

  def loss_fn(params, micro):
    sums = _forward_sums(model, params, micro, num_sources)
    return sums["loss_sum"] / total_weight, sums

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  grad_fn = lambda params, micro: _grads_by_row_groups(value_and_grad, params, micro, row_groups)
  if accum == 1:
    (_, sums), grads = grad_fn(state["params"], batch)
  else:
    micro_batches = _split_micro_batches(batch, accum)

    def body(carry, micro):
      grads_acc, sums_acc = carry
      (_, sums), grads = grad_fn(state["params"], micro)
      return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

    zero_grads = jax.tree.map(jnp.zeros_like, state["params"])
    zero_sums = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(
            lambda p, m: _forward_sums(model, p, m, num_sources),
            state["params"],
            jax.tree.map(lambda x: x[0], micro_batches),
        ),
    )
    (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums), micro_batches)

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  out = objectives.mean_losses(sums)
  if num_sources:
    out["tokens_by_source"] = sums["weight_sum_by_source"]
  out.update(grad_norm=grad_norm, learning_rate=schedule(state["step"]), param_norm=optax.tree.norm(params))
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
  return new_state, out


def eval_step(params, batch, *, model, num_sources: int):
  return _forward_sums(model, params, batch, num_sources)


@dataclasses.dataclass
class CompiledSteps:
  train: Callable
  eval: Callable


def compile_steps(
    model, tx, schedule, mesh, layout: StateLayout, accum: int, num_sources: int, row_groups: int = 1
) -> CompiledSteps:
  """jax.jit with explicit in/out shardings; the state is donated (updated in place).
  row_groups: see `_grads_by_row_groups` (`resolve_row_groups` picks it from the config)."""
  batch_sharding = sharding.batch_sharding(mesh)  # every TokenBatch field
  replicated = NamedSharding(mesh, P())
  train = jax.jit(
      functools.partial(
          train_step,
          model=model,
          tx=tx,
          schedule=schedule,
          accum=accum,
          num_sources=num_sources,
          row_groups=row_groups,
      ),
      in_shardings=(layout.shardings, batch_sharding),
      out_shardings=(layout.shardings, replicated),
      donate_argnums=(0,),
  )
  evaluate = jax.jit(
      functools.partial(eval_step, model=model, num_sources=num_sources),
      in_shardings=(layout.shardings["params"], batch_sharding),
      out_shardings=replicated,
  )

  return CompiledSteps(sharding.on_mesh(train, mesh), sharding.on_mesh(evaluate, mesh))


# ------------------------------------------------------------------------------ loop
@dataclasses.dataclass
class RunResult:
  final_step: int
  last_metrics: dict
  workdir: Path
  stopped_early: str = ""


class _StopFlag:
  """SIGTERM / Ctrl-C request a checkpoint at the next step boundary, then exit."""

  def __init__(self):
    self.reason = ""
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers
        pass
    return self

  def _handle(self, signum, _frame):
    if self.reason:  # a second signal: stop now
      raise KeyboardInterrupt
    self.reason = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def build_model(config: ml_collections.ConfigDict) -> tuple[Transformer, ModelConfig]:
  model_config = ModelConfig.from_config(config.model)
  return Transformer(model_config), model_config


def keep_tokenizer(tokenizer_path: str, workdir: Path) -> None:
  """Copy a built tokenizer (the demo's) into workdir/tokenizer/, where evaluation and export
  look first: a checkpoint is read with the tokenizer it was trained with, whatever the data
  code builds later. A workdir that already keeps another one is refused: its checkpoints
  would go on training on text its vocabulary does not match."""
  target = workdir / "tokenizer" / "tokenizer.model"
  built = Path(tokenizer_path).read_bytes()
  if target.is_file():
    if target.read_bytes() != built:
      raise ValueError(
          f"{target} is the tokenizer this run was trained with, but the data now builds another "
          f"({tokenizer_path}): resume with the code that built the run, or start a new workdir"
      )
    return
  files.write_bytes_atomically(target, built)


def estimate_num_steps(config, sources, tokenizer_path: str, rows_per_step: int) -> int:
  """Steps for data.num_epochs when train.num_steps=-1: the batches of one epoch, counted by
  running the pipeline once (tokenize, truncate, pack), times the epochs.

  Counting beats a token-count formula: packing efficiency depends on the lengths, and a
  weighted mixture ends its epoch when its first source runs out. Every host counts the
  whole split, so all get the same schedule.
  """
  one_epoch = ml_collections.ConfigDict(config.data.to_dict())
  one_epoch.num_epochs = 1
  iterator = iter(pipeline.make_dataset(one_epoch, sources, tokenizer_path, rows=rows_per_step, train=True))
  try:
    batches = sum(1 for _ in iterator)
  finally:
    iterator.close()
  return max(1, batches * int(config.data.num_epochs))


def _validation_loss(steps, params, config, sources, tokenizer_path, rows, mesh, num_sources) -> dict:
  ds = pipeline.make_dataset(
      config.data,
      sources,
      tokenizer_path,
      rows=rows,
      train=False,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  totals, batches = None, iter(ds)
  for _ in range(config.train.eval_batches):
    batch = next(batches, None)
    if not _across_processes(batch is not None, False)[0]:
      break
    arrays = sharding.host_batch_to_global(TokenBatch.from_packed(pipeline.pad_rows(batch, rows)), mesh)
    sums = jax.device_get(steps.eval(params, arrays))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    raise ValueError(f"validation split {config.data.validation_split!r} gave no batch on every process")
  means = jax.device_get(objectives.mean_losses(totals))
  means["tokens_by_source"] = totals.get("weight_sum_by_source", [])
  out = {"val_loss": float(means["loss"])}
  for name in objectives.OBJECTIVES:
    if means[f"tokens_{name}"] > 0:
      out[f"val_loss_{name}"] = float(means[f"loss_{name}"])
  out.update(_per_source(sources, means, "val_loss_source/"))
  return out


def _across_processes(has_batch: bool, stop_requested: bool) -> tuple[bool, bool]:
  """(every process has a batch, some process was asked to stop): the same on all processes.

  Hosts pack different examples, so one may run out of data first, and a signal may reach
  the hosts at different steps; a host that trained or saved alone would hang in a
  collective. With several processes this costs one tiny all-gather per step.
  """
  if jax.process_count() == 1:
    return has_batch, stop_requested
  from jax.experimental import multihost_utils

  flags = np.asarray(multihost_utils.process_allgather(np.asarray([has_batch, stop_requested]))).reshape(-1, 2)
  return bool(flags[:, 0].all()), bool(flags[:, 1].any())


def _per_source(sources, means: dict, prefix: str) -> dict[str, float]:
  """Loss per mixture source, for the sources present (an absent one has no loss, not 0)."""
  return {
      f"{prefix}{source.name}": float(loss)
      for source, loss, tokens in zip(sources, means.get("loss_by_source", []), means.get("tokens_by_source", []))
      if tokens > 0
  }


def check_grad_accum(config: ml_collections.ConfigDict, mesh) -> int:
  """train.grad_accum_steps, checked to divide the per-device batch."""
  accum = int(config.train.grad_accum_steps)
  per_device = sharding.batch_size_per_device(config.train.global_batch_size, mesh)
  if accum < 1 or per_device % accum:
    raise ValueError(
        f"config key train.grad_accum_steps={accum} must divide the per-device batch "
        f"{per_device} (train.global_batch_size / (mesh.data * mesh.fsdp))"
    )
  return accum


def resolve_row_groups(config: ml_collections.ConfigDict, mesh, accum: int) -> int:
  """train.row_groups, with 0 (auto) resolved: 2 on the CPU backend where the per-device
  micro-batch has an even number of rows, else 1. An explicit value must divide it."""
  groups = int(config.train.row_groups)
  micro_rows = sharding.batch_size_per_device(config.train.global_batch_size, mesh) // accum
  if groups == 0:
    return 2 if jax.default_backend() == "cpu" and micro_rows % 2 == 0 else 1
  if groups < 0 or micro_rows % groups:
    raise ValueError(
        f"config key train.row_groups={groups} must divide the per-device micro-batch of {micro_rows} rows "
        f"(train.global_batch_size / (mesh.data * mesh.fsdp) / train.grad_accum_steps), or be 0 (auto)"
    )
  return groups


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    devices: Sequence[jax.Device] | None = None,
    evaluators: Sequence[Callable[[Any], dict]] = (),
) -> RunResult:
  """Trains (or resumes) per `config`, writing checkpoints and metrics under workdir.

  `devices` (default: all) is what the mesh spans, e.g. one of several simulated devices.
  `evaluators` (cftjax.evaluators) run at each evaluation with an EvalContext; their
  metrics join the validation loss and may rank checkpoints (checkpoint.best_metric).
  """
  workdir = Path(workdir)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  mesh = sharding.make_mesh(config.mesh, devices)
  rows = sharding.batch_size_per_process(config.train.global_batch_size, mesh)
  accum = check_grad_accum(config, mesh)

  prepared = sources_lib.prepare(config.data)
  tokenizer_path = sources_lib.tokenizer_path(config.data, prepared)
  if not config.data.get("tokenizer") and Path(tokenizer_path).is_file() and jax.process_index() == 0:
    keep_tokenizer(tokenizer_path, workdir)
  if config.data.source == "demo" and jax.process_index() == 0:
    sources_lib.keep_demo_records(prepared, workdir)
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but config key "
        f"model.vocab_size={config.model.vocab_size}"
    )
  train_sources = sources_lib.load_sources(config.data, "train", prepared)
  num_sources = len(train_sources)
  num_steps = int(config.train.num_steps)
  if num_steps <= 0:
    writer.console("train.num_steps=-1: counting the packed batches of one epoch")
    num_steps = estimate_num_steps(config, train_sources, tokenizer_path, config.train.global_batch_size)
    writer.console(f"train.num_steps=-1: {config.data.num_epochs} epoch(s) ~ {num_steps} steps")

  model, model_config = build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, num_steps)
  layout = state_layout(model, tx, mesh, config.seed)
  steps = compile_steps(model, tx, schedule, mesh, layout, accum, num_sources, resolve_row_groups(config, mesh, accum))

  dataset = pipeline.make_dataset(
      config.data,
      train_sources,
      tokenizer_path,
      rows=rows,
      train=True,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  data_iter = iter(dataset)
  manager = ckpt.make_manager(workdir / "checkpoints", config.checkpoint)
  start = manager.latest_step()
  if start is not None:
    start, state = ckpt.restore_train_state(manager, layout.abstract, data_iter)
    writer.console(f"resumed from {workdir / 'checkpoints' / str(start)}")
    writer.discard_after(start)
  else:
    start = 0
    initial_params = _initial_params(config, model_config, layout, mesh, writer)
    state = init_state(model, tx, mesh, config.seed, layout, initial_params)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  writer.console(
      f"model {model_config.num_params() / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
      f"batch {config.train.global_batch_size}x{config.data.max_length} | steps {start}->{num_steps}"
  )

  writer.start_progress(num_steps, start, bool(config.train.get("progress_bar", True)))
  flops_per_token = metrics_lib.train_flops_per_token(model_config, config.data.max_length)
  validation_sources = None
  pending: list[tuple[int, Any, dict]] = []
  last_good_step, last_metrics, stopped = start, {}, ""
  window_start, window_tokens = time.perf_counter(), 0

  def flush() -> None:
    """Fetches pending step metrics, checks them finite, logs them."""
    nonlocal pending, last_metrics, window_start, window_tokens
    if not pending:
      return
    fetched = jax.device_get([m for _, m, _ in pending])  # waits for the queued steps
    elapsed = time.perf_counter() - window_start
    step_time = elapsed / len(pending)
    tokens_per_second = window_tokens / elapsed if elapsed > 0 else 0.0
    for (step, _, host), device_metrics in zip(pending, fetched):
      m = {k: float(v) for k, v in device_metrics.items() if k not in PER_SOURCE_KEYS}
      m.update(_per_source(train_sources, device_metrics, "loss_source/"))
      m.update(
          host,
          step_time=step_time,
          tokens_per_second=tokens_per_second,
          mfu=metrics_lib.mfu(tokens_per_second, flops_per_token, jax.device_count()),
      )
      # A non-finite gradient poisons the parameters this step wrote, even at a finite loss.
      bad = [f"{k} is {m[k]}" for k in ("loss", "grad_norm") if not math.isfinite(m[k])]
      if bad:
        writer.write(step, m)
        raise TrainingStopped(
            f"{' and '.join(bad)} at step {step}: stopping without saving; the last good checkpoint "
            f"({workdir / 'checkpoints'}, step {manager.latest_step()}) is intact"
        )
      writer.write(step, m)
      last_metrics = m
    writer.console(metrics_lib.format_console(pending[-1][0], num_steps, last_metrics))
    pending = []
    window_start, window_tokens = time.perf_counter(), 0

  def save(step: int, extra_metrics: dict | None = None) -> None:
    flush()
    ckpt.save_train_state(manager, step, state, data_iter, config, extra_metrics)

  step = start
  try:
    with _StopFlag() as stop:
      while step < num_steps:
        batch = next(data_iter, None)
        if batch is not None:
          batch = pipeline.pad_rows(batch, rows)
          host = pipeline.batch_stats(batch)
          arrays = sharding.host_batch_to_global(TokenBatch.from_packed(batch), mesh)
        every_process_has_batch, stop_requested = _across_processes(batch is not None, bool(stop.reason))
        if not every_process_has_batch:
          stopped = "data exhausted"
          writer.console(f"training data exhausted after {config.data.num_epochs} epoch(s) at step {step}")
          break
        state, device_metrics = steps.train(state, arrays)
        step += 1
        writer.advance(1, last_metrics.get("loss"))
        window_tokens += host["nonpad_fraction"] * rows * config.data.max_length * jax.process_count()
        pending.append((step, device_metrics, host))
        eval_metrics = None
        if config.train.eval_every and step % config.train.eval_every == 0:
          if validation_sources is None:
            validation_sources = sources_lib.load_sources(config.data, config.data.validation_split, prepared)
          flush()
          eval_metrics = _validation_loss(
              steps, state["params"], config, validation_sources, tokenizer_path, rows, mesh, num_sources
          )
          for evaluator in evaluators:
            eval_metrics.update(evaluator(EvalContext(model, state["params"], config, tokenizer, mesh, step)))
          writer.write(step, eval_metrics)
          writer.console(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        if step % config.train.log_every == 0:
          flush()
        # One process: the signal may have come during this step. Several: all act on the
        # flags gathered before it, so they save the same step.
        if stop.reason if jax.process_count() == 1 else stop_requested:
          save(step, eval_metrics)
          last_good_step, stopped = step, stop.reason or "stop requested by another process"
          writer.console(f"{stopped}: saved checkpoint at step {step}, exiting")
          break
        if step % config.checkpoint.every_steps == 0 or step == num_steps:
          save(step, eval_metrics)
          last_good_step = step
    if step != last_good_step:
      save(step)
    flush()
  finally:
    manager.wait_until_finished()
    manager.close()
    data_iter.close()  # stops worker processes (data.worker_count > 0)
    writer.close()
  return RunResult(step, last_metrics, workdir, stopped)


def _initial_params(config, model_config, layout: StateLayout, mesh, writer):
  """Params from model.init_from (a HF directory or a cftjax checkpoint), else None."""
  source = config.model.init_from
  if not source:
    return None
  path = Path(source)
  if not path.exists():
    raise FileNotFoundError(
        f"config key model.init_from={source!r} does not exist: import a Hugging Face model with "
        f"`python scripts/convert.py import --hf_dir=DIR --out={source}` or point it at one"
    )
  if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
    from cftjax import hf

    writer.console(f"importing Hugging Face weights from {path}")
    return hf.import_params(path, model_config, mesh)
  writer.console(f"initialising from checkpoint {path}")
  return ckpt.load_params(path, layout.abstract["params"])
