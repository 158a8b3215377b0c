"""Mesh from config, sharded init, and the train step's promises on any layout.

What a user relies on: the same config trains the same model on one device, on a data x
fsdp x tensor mesh, and with gradient accumulation. Starting from the same parameters, the
sharded step and the accumulated step give the loss, gradient and updated parameters of the
plain single-device step within tolerances derived from float32 summation order (see
"tolerances"), and parameters and optimizer state really are split over the mesh.

Compiling a train step costs seconds on CPU, so each layout is compiled once per module
(fixtures below) and every test reads the results.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cftjax import optim, sharding, train
from cftjax.data.batch import TokenBatch
from cftjax.model import ModelConfig, Transformer
from configs import base
import float32_tolerance

MODEL_CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    qkv_bias=True,
)
ROWS, LENGTH, NUM_SOURCES, NUM_STEPS, ACCUM = 8, 16, 2, 2, 4
MESHES = {
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
}


def mesh_config(**sizes) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **sizes})


def empty_batch() -> TokenBatch:
  return TokenBatch.zeros(ROWS, LENGTH)


def packed_batch(seed: int) -> TokenBatch:
  """Rows of 1-3 packed examples plus padding, mixed objectives and sources."""
  rng = np.random.default_rng(seed)
  batch = empty_batch()
  for row in range(ROWS):
    start = 0
    for segment in range(1, rng.integers(1, 4) + 1):
      length = int(rng.integers(3, 7))
      if start + length > LENGTH:
        break
      span = slice(start, start + length)
      batch.inputs[row, span] = rng.integers(1, MODEL_CONFIG.vocab_size, length)
      batch.targets[row, span] = rng.integers(1, MODEL_CONFIG.vocab_size, length)
      batch.positions[row, span] = np.arange(length)
      batch.segment_ids[row, span] = segment
      batch.weights[row, span] = rng.random(length) < 0.7
      batch.objective_ids[row, span] = rng.integers(0, 2)
      batch.source_ids[row, span] = rng.integers(0, NUM_SOURCES)
      start += length
  return batch


def uneven_micro_batches(seed: int) -> TokenBatch:
  """A batch whose ACCUM micro-batches hold 32, 10, 0 and 2 target tokens.

  train_step gives micro-batch a the rows i * ACCUM + a. A mean of per-micro-batch means
  would weight the 2-token micro-batch like the 32-token one (and divide by zero for the
  empty one); the token mean over the global batch must not.
  """
  rng = np.random.default_rng(seed)
  batch = empty_batch()
  batch.inputs[:] = rng.integers(1, MODEL_CONFIG.vocab_size, (ROWS, LENGTH))
  batch.targets[:] = rng.integers(1, MODEL_CONFIG.vocab_size, (ROWS, LENGTH))
  batch.positions[:] = np.arange(LENGTH)
  batch.segment_ids[:] = 1
  batch.objective_ids[:] = (np.arange(ROWS) % 2)[:, None]  # both objectives carry targets
  batch.source_ids[:] = rng.integers(0, NUM_SOURCES, (ROWS, 1))
  for micro, tokens_per_row in enumerate((16, 5, 0, 1)):
    batch.weights[micro::ACCUM, LENGTH - tokens_per_row :] = 1.0
  return batch


# ------------------------------------------------------------------------------ tolerances
# Layouts differ only in the order of their float32 sums (tests/float32_tolerance.py);
# the optimizer's element-wise math, the schedule and the token counts are exact.
# The longest sum: a kernel's gradient adds one outer product per token of the batch.
EPS32 = float32_tolerance.EPS32
REORDER_RTOL = float32_tolerance.reorder_rtol(MODEL_CONFIG.num_layers, ROWS * LENGTH)  # ~4.9e-5


def gradient_tolerance(grads_reference):
  return float32_tolerance.gradient_tolerance(grads_reference, REORDER_RTOL)


def assert_gradients_close(got, want, where: str):
  float32_tolerance.assert_gradients_close(got, want, REORDER_RTOL, where)


def assert_metrics_close(got: dict, want: dict, grads_want, where: str):
  assert np.isfinite(want["loss"]) and want["tokens_cft"] > 0 and want["tokens_sft"] > 0, where
  # Counts are sums of 0/1 weights (exact in float32 below 2**24); the learning rate is the
  # schedule at the replicated step counter: both exact.
  for key in ("tokens_cft", "tokens_sft", "learning_rate"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=f"{where} {key}")
  # Token means of cross entropies near log(vocab): sums of positive terms, no cancellation.
  for key in ("loss", "loss_cft", "loss_sft", "loss_by_source"):
    np.testing.assert_allclose(got[key], want[key], rtol=REORDER_RTOL, atol=0, err_msg=f"{where} {key}")
  # | |a| - |b| | <= |a - b|: the norm of the gradient tolerances, plus the norm's own sum of
  # n squares (relative EPS32 * sqrt(n)).
  tolerances, sizes = gradient_tolerance(grads_want), [np.size(g) for g in jax.tree.leaves(grads_want)]
  norm_tolerance = float(np.sqrt(sum(n * t**2 for n, t in zip(sizes, jax.tree.leaves(tolerances)))))
  norm_tolerance += EPS32 * np.sqrt(sum(sizes)) * float(want["grad_norm"])
  np.testing.assert_allclose(
      got["grad_norm"], want["grad_norm"], rtol=0, atol=norm_tolerance, err_msg=f"{where} grad_norm"
  )


# ------------------------------------------------------------------------------ optimizers
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
CLIP_NORM = 0.5  # below the first gradient norm: clipping is active


class RecordedGradients(NamedTuple):
  grads: Any  # params-shaped, so the state layout gives it the params' shardings


def record_gradients() -> optax.GradientTransformation:
  """Passes the gradient through and keeps it in the optimizer state, where a test reads
  exactly what the train step computed, before any optimizer math."""
  return optax.GradientTransformation(
      init=lambda params: RecordedGradients(jax.tree.map(jnp.zeros_like, params)),
      update=lambda grads, state, params=None: (grads, RecordedGradients(grads)),
  )


def adamw():
  """The project's chain (clipping, AdamW with masked weight decay), gradient recorded."""
  optim_config = base.get_config().optim
  optim_config.learning_rate = LEARNING_RATE
  optim_config.warmup_steps = 0
  optim_config.weight_decay = WEIGHT_DECAY
  optim_config.grad_clip_norm = CLIP_NORM
  tx, schedule = optim.make_optimizer(optim_config, num_steps=10)
  return optax.chain(record_gradients(), tx), schedule


def sgd():
  """Plain SGD: params - lr * grad is linear in the gradient, so a gradient tolerance
  carries over to the parameters as lr times it."""
  return optax.chain(record_gradients(), optax.sgd(LEARNING_RATE)), optax.constant_schedule(LEARNING_RATE)


OPTIMIZERS = {"adamw": adamw, "sgd": sgd}


class Layout:
  """One mesh, its state layout and its compiled steps."""

  def __init__(self, mesh, accum: int = 1, optimizer: str = "adamw", row_groups: int = 1):
    self.mesh = mesh
    self.model = Transformer(MODEL_CONFIG)
    self.tx, schedule = OPTIMIZERS[optimizer]()
    self.layout = train.state_layout(self.model, self.tx, mesh, seed=0)
    self.steps = train.compile_steps(self.model, self.tx, schedule, mesh, self.layout, accum, NUM_SOURCES, row_groups)

  def seed_state(self):
    return train.init_state(self.model, self.tx, self.mesh, 0, self.layout)

  def state_from(self, host_params):
    """A fresh state from host params, placed without another compile of init_state."""
    state = {"step": np.int32(0), "params": host_params, "opt_state": self.tx.init(host_params)}
    return jax.device_put(state, self.layout.shardings)

  def run(self, state, batches) -> dict:
    """Every step's metrics, the gradient it computed and the parameters it left."""
    metrics, grads, params = [], [], []
    for batch in batches:
      state, step_metrics = self.steps.train(state, sharding.host_batch_to_global(batch, self.mesh))
      metrics.append(jax.device_get(step_metrics))
      grads.append(jax.device_get(state["opt_state"][0].grads))
      params.append(jax.device_get(state["params"]))
    return {"state": state, "params": params[-1], "params_by_step": params, "grads": grads, "metrics": metrics}


TRAIN_BATCHES = [packed_batch(i) for i in range(NUM_STEPS)]


@pytest.fixture(scope="module")
def seed_init():
  """The real path: the train state created from the seed directly on the 2x2x2 mesh."""
  layout = Layout(sharding.make_mesh(mesh_config(**MESHES["data2_fsdp2_tensor2"])))
  state = layout.seed_state()
  specs = jax.tree.map(lambda x: x.sharding.spec, state["params"])
  host_state = jax.device_get(state)  # train steps donate their input: keep a copy to re-place
  return {"layout": layout, "host_state": host_state, "initial": host_state["params"], "specs": specs}


@pytest.fixture(scope="module")
def single_device(seed_init):
  """adamw and sgd runs on one device from the seed's parameters."""
  mesh = sharding.make_mesh(mesh_config(), jax.devices()[:1])
  out = {"initial": seed_init["initial"]}
  for name in OPTIMIZERS:
    layout = Layout(mesh, optimizer=name)
    out[name] = layout.run(layout.state_from(seed_init["initial"]), TRAIN_BATCHES)
    out[name]["layout"] = layout
  return out


@pytest.fixture(scope="module", params=sorted(MESHES))
def sharded(request, seed_init):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  mesh_sizes = MESHES[request.param]
  out = {}
  if request.param == "data2_fsdp2_tensor2":
    layout = seed_init["layout"]
    state = jax.device_put(seed_init["host_state"], layout.layout.shardings)
  else:
    layout = Layout(sharding.make_mesh(mesh_config(**mesh_sizes)))
    state = train.init_state(layout.model, layout.tx, layout.mesh, 0, layout.layout, seed_init["initial"])
  out["adamw"] = layout.run(state, TRAIN_BATCHES)
  out["adamw"]["layout"] = layout
  sgd_layout = Layout(layout.mesh, optimizer="sgd")
  out["sgd"] = sgd_layout.run(sgd_layout.state_from(seed_init["initial"]), TRAIN_BATCHES)
  # What the sharding tests below read: the real optimizer's state on this mesh.
  out.update(state=out["adamw"]["state"], layout=layout, mesh=layout.mesh)
  return out


def sgd_parameter_tolerance(grads_by_step, params):
  """After k SGD steps the parameters differ by at most lr times the summed gradient
  tolerances, plus one float32 rounding of p - lr * g per step."""
  tolerance = jax.tree.map(lambda p: 0.0, params)
  for grads in grads_by_step:
    tolerance = jax.tree.map(
        lambda t, g_tol, p: t + LEARNING_RATE * g_tol + EPS32 * np.abs(p), tolerance, gradient_tolerance(grads), params
    )
  return tolerance


def adam_first_step_tolerance(grads, grad_norm, params):
  """Per element: how far AdamW's first update may move given the gradient tolerance.

  Step 1 (bias-corrected moments m = g, v = g**2 of the clipped gradient g) moves a
  parameter by -lr * (f(g) + wd * p) with f(g) = g / (|g| + eps). For |a - b| <= d,
  |f(a) - f(b)| <= d / (min(|a|, |b|) + eps) <= d / (max(|g| - d, 0) + eps), and never more
  than 2: where the gradient is within rounding of 0 its sign, hence the update, is free.
  The clip factor CLIP_NORM / grad_norm carries the norm's reordering error (REORDER_RTOL).
  Plus a few roundings of the update arithmetic (sqrt, divide, add: 4 eps) and of p + u;
  wd * p is the same on both sides (same p, element-wise).
  """
  eps = float(base.get_config().optim.eps)
  clip = min(1.0, CLIP_NORM / float(grad_norm))

  def bound(g, g_tol, p):
    clipped = clip * np.abs(g)
    d = clip * g_tol + REORDER_RTOL * clipped
    sensitivity = np.minimum(2.0, d / (np.maximum(clipped - d, 0.0) + eps))
    sensitivity[g == 0] = 0.0  # no term reached it (an unseen token's embedding): exact, f(0) = 0
    return LEARNING_RATE * (sensitivity + 4 * EPS32) + EPS32 * np.abs(p)

  return jax.tree.map(bound, grads, gradient_tolerance(grads), params)


def assert_same_sgd_training(got: dict, want: dict, where: str):
  """SGD runs from the same params on the same batches in two layouts: every step's
  metrics and gradient within float32 reordering, the parameters within lr times that."""
  for step in range(NUM_STEPS):
    at = f"{where} sgd step {step}"
    assert_metrics_close(got["metrics"][step], want["metrics"][step], want["grads"][step], at)
    assert_gradients_close(got["grads"][step], want["grads"][step], f"{at} gradient")
    # A parameter difference of lr * tolerance feeds the next gradient only through the
    # Hessian (lr * |H| << 1 here): inside that step's own gradient tolerance.
    tolerance = sgd_parameter_tolerance(want["grads"][: step + 1], want["params_by_step"][step])
    assert_within(got["params_by_step"][step], want["params_by_step"][step], tolerance, f"{at} params")


def assert_same_adamw_training(got: dict, want: dict, initial, where: str):
  """The project's AdamW chain in two layouts: the first step's gradient and metrics within
  float32 reordering, its parameters within Adam's sensitivity to that gradient tolerance,
  and the second step's loss within the first-order change |grad| * |params difference|."""
  first = want["metrics"][0]
  assert first["grad_norm"] > CLIP_NORM, "clipping is active, so the test covers it"
  assert_metrics_close(got["metrics"][0], first, want["grads"][0], f"{where} adamw step 0")
  assert_gradients_close(got["grads"][0], want["grads"][0], f"{where} adamw step 0 gradient")
  tolerance = adam_first_step_tolerance(want["grads"][0], first["grad_norm"], initial)
  assert_within(got["params_by_step"][0], want["params_by_step"][0], tolerance, f"{where} adamw step 0 params")
  # The bound reaches lr (Adam's free sign) only where the gradient lies within its own
  # tolerance of 0 (e.g. k_proj's bias: softmax cancels it, so its gradient is rounding).
  # A guard that such elements stay rare, so the check above holds nearly all elements to
  # about lr * REORDER_RTOL / |g|:
  free = sum(int(np.sum(t >= LEARNING_RATE)) for t in jax.tree.leaves(tolerance))
  assert free < 1e-2 * sum(t.size for t in jax.tree.leaves(tolerance)), free
  # Step 1 starts from parameters |dp| apart: its loss moves by |grad(x)| * |dp| for some x
  # between them (mean value theorem); over a distance of a few lr, |grad(x)| stays within
  # twice the gradient norm measured at one end.
  dp = float(optax.tree.norm(jax.tree.map(np.subtract, got["params_by_step"][0], want["params_by_step"][0])))
  second = want["metrics"][1]
  np.testing.assert_allclose(
      got["metrics"][1]["loss"],
      second["loss"],
      rtol=0,
      atol=REORDER_RTOL * abs(second["loss"]) + 2 * float(second["grad_norm"]) * dp,
      err_msg=f"{where} adamw step 1 loss",
  )


def assert_within(got, want, tolerance, where: str):
  """|got - want| <= tolerance element-wise; the message names the worst element."""
  assert jax.tree.structure(got) == jax.tree.structure(want), where
  for (path, w), g, t in zip(
      jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(tolerance)
  ):
    excess = np.abs(g - w) - t
    worst = np.unravel_index(np.argmax(excess), np.shape(excess)) if np.ndim(excess) else ()
    assert np.all(excess <= 0), (
        f"{where} {jax.tree_util.keystr(path)}{list(worst)}: {g[worst]} vs {w[worst]}, "
        f"difference {abs(g[worst] - w[worst]):.3g} > tolerance {np.asarray(t)[worst] if np.ndim(t) else t:.3g}"
    )


# ------------------------------------------------------------------------------ mesh_shape
@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        (dict(data=-1), 8, (8, 1, 1)),
        (dict(data=-1, fsdp=2, tensor=2), 8, (2, 2, 2)),
        (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
        (dict(data=1, fsdp=4, tensor=-1), 8, (1, 4, 2)),
        (dict(data=1, fsdp=1, tensor=1), 1, (1, 1, 1)),
        (dict(data=-1), 1, (1, 1, 1)),
    ],
)
def test_mesh_shape_resolves_minus_one_to_the_remaining_devices(sizes, devices, expected):
  assert sharding.mesh_shape(mesh_config(**sizes), devices) == expected


@pytest.mark.parametrize(
    "sizes, devices, message",
    [
        (dict(data=-1, fsdp=-1), 8, "at most one axis may be -1"),
        (dict(data=0), 8, "positive or -1"),
        (dict(fsdp=-2), 8, "positive or -1"),
        (dict(data=-1, fsdp=3), 8, "not divisible"),
        (dict(data=2, fsdp=2, tensor=1), 8, "needs 4 devices but 8 are present"),
        (dict(data=4, fsdp=4), 8, "needs 16 devices"),
    ],
)
def test_mesh_shape_rejects_bad_configs_naming_the_keys(sizes, devices, message):
  with pytest.raises(ValueError, match=message) as error:
    sharding.mesh_shape(mesh_config(**sizes), devices)
  assert "mesh." in str(error.value)


def test_make_mesh_has_named_auto_axes_over_the_given_devices():
  mesh = sharding.make_mesh(mesh_config(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  single = sharding.make_mesh(mesh_config(data=-1), jax.devices()[:1])
  assert single.devices.size == 1


def test_batch_size_per_process_needs_rows_divisible_by_data_times_fsdp():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  assert sharding.batch_size_per_process(8, mesh) == 8  # one process holds all rows
  with pytest.raises(ValueError, match="train.global_batch_size=6 must be divisible by mesh data x fsdp = 4"):
    sharding.batch_size_per_process(6, mesh)


def test_host_batch_is_split_over_data_and_fsdp_and_keeps_sequences_whole():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  batch = sharding.host_batch_to_global(packed_batch(0), mesh)
  for name in TokenBatch.fields():
    array = getattr(batch, name)
    assert array.sharding.spec == P(("data", "fsdp")), name
    assert array.addressable_shards[0].data.shape == (ROWS // 4, LENGTH), name
    np.testing.assert_array_equal(np.asarray(array), getattr(packed_batch(0), name))


def test_shardings_like_params_gives_adam_moments_the_param_shardings():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  params = {"a": {"kernel": np.zeros((4, 8))}, "norm": {"scale": np.zeros((4,))}}
  param_shardings = {
      "a": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
      "norm": {"scale": NamedSharding(mesh, P("fsdp"))},
  }
  tx = optax.adam(1e-3)
  opt_state = jax.eval_shape(tx.init, params)
  got = sharding.shardings_like_params(opt_state, params, param_shardings, mesh)
  assert got[0].mu == param_shardings and got[0].nu == param_shardings
  assert got[0].count.spec == P()  # not a parameter: replicated


def test_a_dimension_the_mesh_does_not_divide_is_replicated_not_rejected():
  # 2 kv heads on tensor=4 (as Qwen2.5-7B's 4 kv heads on tensor=8) and a vocab of 61.
  config = dataclasses.replace(MODEL_CONFIG, vocab_size=61, num_kv_heads=2)
  model = Transformer(config)
  mesh = sharding.make_mesh(mesh_config(data=1, fsdp=2, tensor=4))
  abstract, shardings = sharding.abstract_params_and_shardings(train.init_params_fn(model, 0), mesh)
  attn = shardings["layers"]["attn"]
  assert attn["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)  # 4 heads: split
  assert attn["k_proj"]["kernel"].spec == P(None, "fsdp", None, None)  # 2 kv heads: replicated
  assert attn["k_proj"]["bias"].spec == P(None, None, None)
  assert shardings["embed"]["embedding"].spec == P(None, "fsdp")  # vocab 61: replicated
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    jax.device_put(np.zeros(leaf.shape, leaf.dtype), leaf_sharding)  # jit accepts what this accepts


def test_fit_sharding_to_shape_checks_the_product_of_grouped_axes():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  grouped = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  assert sharding.fit_sharding_to_shape(grouped, (8, 6)).spec == P(("data", "fsdp"), "tensor")
  assert sharding.fit_sharding_to_shape(grouped, (6, 6)).spec == P(None, "tensor")  # 6 % 4
  assert sharding.fit_sharding_to_shape(grouped, (8, 3)).spec == P(("data", "fsdp"), None)


# ------------------------------------------------------------------------------ sharded step
def test_seed_init_is_sharded_and_looks_like_the_model_init(seed_init):
  params = seed_init["initial"]
  assert np.all(params["final_norm"]["scale"] == 1.0)
  assert np.all(params["layers"]["attn"]["q_proj"]["bias"] == 0.0)
  q_kernel = params["layers"]["attn"]["q_proj"]["kernel"]
  assert 0.015 < q_kernel.std() < 0.025  # normal(0.02)
  assert not np.allclose(q_kernel[0], q_kernel[1])  # each scanned layer has its own draw
  assert seed_init["specs"]["embed"]["embedding"] == P("tensor", "fsdp")


def test_sharded_train_steps_match_the_single_device_steps(single_device, sharded):
  assert_same_sgd_training(sharded["sgd"], single_device["sgd"], "sharded")
  assert_same_adamw_training(sharded["adamw"], single_device["adamw"], single_device["initial"], "sharded")
  # Adam's steps moved every parameter by about lr (the comparisons are not vacuous; every
  # leaf's gradient is non-zero, which assert_gradients_close checks).
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), single_device["adamw"]["params"], single_device["initial"])
  assert min(jax.tree.leaves(moved)) > 1e-4


def test_parameters_are_really_split_over_fsdp_and_tensor(sharded):
  params = sharded["state"]["params"]
  mesh = sharded["mesh"]
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  embedding = params["embed"]["embedding"]  # (vocab, embed) -> (tensor, fsdp)
  assert embedding.sharding.spec == P("tensor", "fsdp")
  assert embedding.addressable_shards[0].data.shape == (
      MODEL_CONFIG.vocab_size // tensor,
      MODEL_CONFIG.hidden_size // fsdp,
  )
  q_kernel = params["layers"]["attn"]["q_proj"]["kernel"]  # (layers, embed, heads, head_dim)
  assert q_kernel.addressable_shards[0].data.shape == (
      MODEL_CONFIG.num_layers,
      MODEL_CONFIG.hidden_size // fsdp,
      MODEL_CONFIG.num_heads // tensor,
      MODEL_CONFIG.head_dim,
  )
  down = params["layers"]["mlp"]["down_proj"]["kernel"]  # (layers, mlp, embed)
  assert down.sharding.spec == P(None, "tensor", "fsdp")
  # Each device holds about 1/(fsdp*tensor) of the model: nothing is whole on one device.
  total = sum(x.size for x in jax.tree.leaves(params))
  per_device = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(params))
  assert per_device < total / (fsdp * tensor) * 1.2


def test_optimizer_moments_carry_the_parameter_shardings(sharded):
  state = sharded["state"]
  param_specs = jax.tree.map(lambda x: x.sharding.spec, state["params"])
  adam_states = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
  assert len(adam_states) == 1
  assert jax.tree.map(lambda x: x.sharding.spec, adam_states[0].mu) == param_specs
  assert jax.tree.map(lambda x: x.sharding.spec, adam_states[0].nu) == param_specs
  assert state["step"].sharding.spec == P() and int(state["step"]) == NUM_STEPS
  # The layout given to jit is what the arrays carry.
  layout_specs = jax.tree.map(lambda s: s.spec, sharded["layout"].layout.shardings["params"])
  assert layout_specs == param_specs


# ------------------------------------------------------------------------------ accumulation
@pytest.fixture(scope="module")
def accumulation(single_device):
  """The same uneven batches through accum=1 and accum=ACCUM, from the same params.

  SGD only: accumulation changes how the gradient is summed, not what the optimizer does
  with it (the sharded test covers AdamW's sensitivity).
  """
  batches = [uneven_micro_batches(10 + i) for i in range(NUM_STEPS)]
  plain = single_device["sgd"]["layout"]
  accumulated = Layout(plain.mesh, accum=ACCUM, optimizer="sgd")
  return {
      "plain": plain.run(plain.state_from(single_device["initial"]), batches),
      "accumulated": accumulated.run(accumulated.state_from(single_device["initial"]), batches),
      "batches": batches,
  }


def test_uneven_micro_batches_really_are_uneven():
  weights = uneven_micro_batches(0).weights
  per_micro = [weights[a::ACCUM].sum() for a in range(ACCUM)]
  assert per_micro == [32, 10, 0, 2]


@pytest.fixture(scope="module")
def row_grouped(single_device, accumulation):
  """The accumulation batches with each step's rows as independent graphs: 4 groups on one
  device (groups of 2 rows, holding 32 / 10 / 0 / 2 target tokens as the micro-batches
  do), and 2 groups of each of 2 micro-batches on the data2 x fsdp2 x tensor2 mesh."""
  batches = accumulation["batches"]
  grouped = Layout(single_device["sgd"]["layout"].mesh, optimizer="sgd", row_groups=ACCUM)
  sharded_grouped = Layout(sharding.make_mesh(mesh_config(**MESHES["data2_fsdp2_tensor2"])), 2, "sgd", row_groups=2)
  return {
      "one device": grouped.run(grouped.state_from(single_device["initial"]), batches),
      "sharded, accumulated": sharded_grouped.run(sharded_grouped.state_from(single_device["initial"]), batches),
  }


@pytest.mark.parametrize("layout", ["one device", "sharded, accumulated"])
def test_row_groups_train_like_one_graph(row_grouped, accumulation, layout):
  got, plain = row_grouped[layout], accumulation["plain"]
  assert_same_sgd_training(got, plain, f"row groups, {layout}")
  for step, metrics in enumerate(got["metrics"]):
    assert metrics["tokens_cft"] + metrics["tokens_sft"] == accumulation["batches"][step].weights.sum()


def test_row_groups_resolve_from_config():
  def resolve(row_groups, global_batch_size, accum=1, **mesh_sizes):
    config = base.get_config()
    config.train.row_groups, config.train.global_batch_size = row_groups, global_batch_size
    config.mesh.update(mesh_config(**mesh_sizes))
    devices = jax.devices()[: config.mesh.data * config.mesh.fsdp * config.mesh.tensor]
    return train.resolve_row_groups(config, sharding.make_mesh(config.mesh, devices), accum)

  assert resolve(0, 16) == 2  # auto on CPU: two graphs where the rows split evenly
  assert resolve(0, 6, accum=2) == 1  # 3 rows per micro-batch
  assert resolve(0, 8, data=4) == 2 and resolve(0, 4, data=4) == 1  # 2 rows / 1 row per device
  assert resolve(4, 16, accum=2) == 4
  with pytest.raises(ValueError, match=r"train.row_groups=3 must divide the per-device micro-batch of 16 rows"):
    resolve(3, 16)


def test_gradient_accumulation_equals_one_big_batch(accumulation):
  plain, accumulated = accumulation["plain"], accumulation["accumulated"]
  assert_same_sgd_training(accumulated, plain, "accumulated")
  for step, got in enumerate(accumulated["metrics"]):
    assert got["tokens_cft"] + got["tokens_sft"] == accumulation["batches"][step].weights.sum()
