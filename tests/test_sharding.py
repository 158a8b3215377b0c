"""Mesh from config, sharded init, and the train step's promises on any layout.

What a user relies on: the same config trains the same model on one device, on a data x
fsdp x tensor mesh, and with gradient accumulation. Starting from the same parameters, the
sharded step and the accumulated step give the loss and updated parameters of the plain
single-device step within float32 tolerance, and parameters and optimizer state really are
split over the mesh.

Compiling a train step costs seconds on CPU, so each layout is compiled once per module
(fixtures below) and every test reads the results.
"""

import dataclasses

import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cftjax import optim, sharding, train
from cftjax.model import ModelConfig, Transformer
from configs import base

MODEL_CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, qkv_bias=True,
)
ROWS, LENGTH, NUM_SOURCES, NUM_STEPS, ACCUM = 8, 16, 2, 2, 4
MESHES = {
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
}


def mesh_config(**sizes) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **sizes})


def empty_batch() -> dict[str, np.ndarray]:
  batch = {k: np.zeros((ROWS, LENGTH), np.int32) for k in train.BATCH_KEYS}
  batch["weights"] = np.zeros((ROWS, LENGTH), np.float32)
  return batch


def packed_batch(seed: int) -> dict[str, np.ndarray]:
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
      batch["inputs"][row, span] = rng.integers(1, MODEL_CONFIG.vocab_size, length)
      batch["targets"][row, span] = rng.integers(1, MODEL_CONFIG.vocab_size, length)
      batch["positions"][row, span] = np.arange(length)
      batch["segment_ids"][row, span] = segment
      batch["weights"][row, span] = rng.random(length) < 0.7
      batch["objective_ids"][row, span] = rng.integers(0, 2)
      batch["source_ids"][row, span] = rng.integers(0, NUM_SOURCES)
      start += length
  return batch


def uneven_micro_batches(seed: int) -> dict[str, np.ndarray]:
  """A batch whose ACCUM micro-batches hold 32, 10, 0 and 2 target tokens.

  train_step gives micro-batch a the rows i * ACCUM + a. A mean of per-micro-batch means
  would weight the 2-token micro-batch like the 32-token one (and divide by zero for the
  empty one); the token mean over the global batch must not.
  """
  rng = np.random.default_rng(seed)
  batch = empty_batch()
  batch["inputs"][:] = rng.integers(1, MODEL_CONFIG.vocab_size, (ROWS, LENGTH))
  batch["targets"][:] = rng.integers(1, MODEL_CONFIG.vocab_size, (ROWS, LENGTH))
  batch["positions"][:] = np.arange(LENGTH)
  batch["segment_ids"][:] = 1
  batch["objective_ids"][:] = (np.arange(ROWS) % 2)[:, None]  # both objectives carry targets
  batch["source_ids"][:] = rng.integers(0, NUM_SOURCES, (ROWS, 1))
  for micro, tokens_per_row in enumerate((16, 5, 0, 1)):
    batch["weights"][micro::ACCUM, LENGTH - tokens_per_row:] = 1.0
  return batch


def optimizer():
  optim_config = base.get_config().optim
  optim_config.learning_rate = 1e-3  # float32 noise in Adam's update scales with lr
  optim_config.warmup_steps = 0
  optim_config.weight_decay = 0.1
  optim_config.grad_clip_norm = 0.5  # below the first gradient norm: clipping is active
  return optim.make_optimizer(optim_config, num_steps=10)


class Layout:
  """One mesh, its state layout and its compiled steps."""

  def __init__(self, mesh, accum: int = 1):
    self.mesh = mesh
    self.model = Transformer(MODEL_CONFIG)
    self.tx, schedule = optimizer()
    self.layout = train.state_layout(self.model, self.tx, mesh, seed=0)
    self.steps = train.compile_steps(self.model, self.tx, schedule, mesh, self.layout, accum, NUM_SOURCES)

  def seed_state(self):
    return train.init_state(self.model, self.tx, self.mesh, 0, self.layout)

  def state_from(self, host_params):
    """A fresh state from host params, placed without another compile of init_state."""
    state = {"step": np.int32(0), "params": host_params, "opt_state": self.tx.init(host_params)}
    return jax.device_put(state, self.layout.shardings)

  def run(self, state, batches) -> dict:
    metrics = []
    for batch in batches:
      state, step_metrics = self.steps.train(state, sharding.host_batch_to_global(batch, self.mesh))
      metrics.append(jax.device_get(step_metrics))
    return {"state": state, "params": jax.device_get(state["params"]), "metrics": metrics}


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
  layout = Layout(sharding.make_mesh(mesh_config(), jax.devices()[:1]))
  result = layout.run(layout.state_from(seed_init["initial"]), TRAIN_BATCHES)
  result.update(layout=layout, initial=seed_init["initial"])
  return result


@pytest.fixture(scope="module", params=sorted(MESHES))
def sharded(request, seed_init):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  if request.param == "data2_fsdp2_tensor2":
    layout = seed_init["layout"]
    state = jax.device_put(seed_init["host_state"], layout.layout.shardings)
  else:
    layout = Layout(sharding.make_mesh(mesh_config(**MESHES[request.param])))
    state = train.init_state(layout.model, layout.tx, layout.mesh, 0, layout.layout, seed_init["initial"])
  result = layout.run(state, TRAIN_BATCHES)
  result.update(layout=layout, mesh=layout.mesh)
  return result


def assert_trees_close(actual, expected, rtol, atol):
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for path, a, e in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=path)


def assert_metrics_close(got: dict, want: dict, where: str):
  assert np.isfinite(want["loss"]) and want["tokens_cft"] > 0 and want["tokens_sft"] > 0, where
  for key in ("loss", "loss_cft", "loss_sft", "tokens_cft", "tokens_sft", "grad_norm",
              "learning_rate", "loss_by_source"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{where} {key}")


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
  for name, array in batch.items():
    assert array.sharding.spec == P(("data", "fsdp")), name
    assert array.addressable_shards[0].data.shape == (ROWS // 4, LENGTH), name
    np.testing.assert_array_equal(np.asarray(array), packed_batch(0)[name])


def test_shardings_like_params_gives_adam_moments_the_param_shardings():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  params = {"a": {"kernel": np.zeros((4, 8))}, "norm": {"scale": np.zeros((4,))}}
  param_shardings = {"a": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
                     "norm": {"scale": NamedSharding(mesh, P("fsdp"))}}
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
  for step, (got, want) in enumerate(zip(sharded["metrics"], single_device["metrics"])):
    assert_metrics_close(got, want, f"step {step}")
  assert single_device["metrics"][0]["grad_norm"] > 0.5  # the clip (0.5) was active
  assert_trees_close(sharded["params"], single_device["params"], rtol=1e-5, atol=1e-6)
  # The steps did change every parameter (the comparison above is not vacuous).
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), single_device["params"], single_device["initial"])
  assert min(jax.tree.leaves(moved)) > 1e-4


def test_parameters_are_really_split_over_fsdp_and_tensor(sharded):
  params = sharded["state"]["params"]
  mesh = sharded["mesh"]
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  embedding = params["embed"]["embedding"]  # (vocab, embed) -> (tensor, fsdp)
  assert embedding.sharding.spec == P("tensor", "fsdp")
  assert embedding.addressable_shards[0].data.shape == (
      MODEL_CONFIG.vocab_size // tensor, MODEL_CONFIG.hidden_size // fsdp)
  q_kernel = params["layers"]["attn"]["q_proj"]["kernel"]  # (layers, embed, heads, head_dim)
  assert q_kernel.addressable_shards[0].data.shape == (
      MODEL_CONFIG.num_layers, MODEL_CONFIG.hidden_size // fsdp, MODEL_CONFIG.num_heads // tensor,
      MODEL_CONFIG.head_dim)
  down = params["layers"]["mlp"]["down_proj"]["kernel"]  # (layers, mlp, embed)
  assert down.sharding.spec == P(None, "tensor", "fsdp")
  # Each device holds about 1/(fsdp*tensor) of the model: nothing is whole on one device.
  total = sum(x.size for x in jax.tree.leaves(params))
  per_device = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(params))
  assert per_device < total / (fsdp * tensor) * 1.2


def test_optimizer_moments_carry_the_parameter_shardings(sharded):
  state = sharded["state"]
  param_specs = jax.tree.map(lambda x: x.sharding.spec, state["params"])
  adam_states = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda s: hasattr(s, "mu"))
                 if hasattr(s, "mu")]
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
  """The same uneven batches through accum=1 and accum=ACCUM, from the same params."""
  batches = [uneven_micro_batches(10 + i) for i in range(NUM_STEPS)]
  plain = single_device["layout"]
  accumulated = Layout(plain.mesh, accum=ACCUM)
  return {
      "plain": plain.run(plain.state_from(single_device["initial"]), batches),
      "accumulated": accumulated.run(accumulated.state_from(single_device["initial"]), batches),
      "batches": batches,
  }


def test_uneven_micro_batches_really_are_uneven():
  weights = uneven_micro_batches(0)["weights"]
  per_micro = [weights[a::ACCUM].sum() for a in range(ACCUM)]
  assert per_micro == [32, 10, 0, 2]


def test_gradient_accumulation_equals_one_big_batch(accumulation):
  plain, accumulated = accumulation["plain"], accumulation["accumulated"]
  for step, (got, want) in enumerate(zip(accumulated["metrics"], plain["metrics"])):
    assert_metrics_close(got, want, f"step {step}")
    assert got["tokens_cft"] + got["tokens_sft"] == accumulation["batches"][step]["weights"].sum()
  assert_trees_close(accumulated["params"], plain["params"], rtol=1e-5, atol=1e-6)
