"""The transformer: its config switches change how it runs, never what it computes.

scan vs unrolled layers, remat policies, GQA vs MHA with repeated heads, QKV bias, tied
embeddings and bf16 compute are each checked against an equivalent model; every parameter
and the main activations carry logical axis names for the sharding rules.
Parameters are drawn on the host from the model's abstract shapes, so a test pays only for
compiling the forward pass it checks; each (config, function) pair is compiled once.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cftjax import objectives, sharding
from cftjax.model import REMAT_POLICIES, ModelConfig, Transformer, transpose_kernels
from configs import base
import float32_tolerance
from random_params import draw_params

BASE = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    rope_theta=1000.0,
)
BATCH, LENGTH = 2, 16


def variant(**changes) -> ModelConfig:
  return dataclasses.replace(BASE, **changes)


def boxed_abstract_params(config: ModelConfig):
  dummy = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), dummy, dummy, dummy + 1))["params"]


def host_params(config: ModelConfig, seed: int = 0):
  """Random params of the model's shapes, drawn with numpy (no compiled init)."""
  return draw_params(nn.meta.unbox(boxed_abstract_params(config)), seed)


def unstack_layers(params):
  """Scanned params (leading layer axis under 'layers') -> unrolled 'layers_i' params."""
  out = {k: v for k, v in params.items() if k != "layers"}
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def packed_inputs(seed: int = 0):
  """Two rows: one packed with two examples and padding, one single example."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, BASE.vocab_size, (BATCH, LENGTH)).astype(np.int32)
  segments = np.array([[1] * 7 + [2] * 6 + [0] * 3, [1] * LENGTH], np.int32)
  positions = np.array([list(range(7)) + list(range(6)) + [0] * 3, list(range(LENGTH))], np.int32)
  targets = rng.integers(0, BASE.vocab_size, (BATCH, LENGTH)).astype(np.int32)
  weights = (segments > 0).astype(np.float32)
  return tokens, positions, segments, targets, weights


@functools.lru_cache(maxsize=None)
def compiled_forward(config: ModelConfig):
  model = Transformer(config)
  return jax.jit(lambda params, *inputs: model.apply({"params": params}, *inputs)[0])


@functools.lru_cache(maxsize=None)
def compiled_loss_and_grads(config: ModelConfig):
  model = Transformer(config)

  def loss(params, tokens, positions, segments, targets, weights):
    logits, _ = model.apply({"params": params}, tokens, positions, segments)
    sums = objectives.loss_sums(logits, targets, weights, jnp.zeros_like(targets))
    return sums["loss_sum"] / sums["weight_sum"]

  return jax.jit(jax.value_and_grad(loss))


def logits_of(config: ModelConfig, params, seed: int = 0) -> np.ndarray:
  tokens, positions, segments, _, _ = packed_inputs(seed)
  out = np.asarray(compiled_forward(config)(params, tokens, positions, segments))
  assert out.dtype == np.float32 and out.shape == (BATCH, LENGTH, config.vocab_size)
  assert np.isfinite(out).all()
  return out


@pytest.fixture(scope="module")
def base_params():
  return host_params(BASE)


@pytest.fixture(scope="module")
def base_logits(base_params):
  return logits_of(BASE, base_params)


# ------------------------------------------------------------------------------ layers
def test_scanned_and_unrolled_layers_give_the_same_logits(base_params, base_logits):
  unrolled = variant(scan_layers=False)
  params = unstack_layers(base_params)
  assert jax.tree.structure(params) == jax.tree.structure(host_params(unrolled))
  np.testing.assert_allclose(logits_of(unrolled, params), base_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes", [{}, dict(scan_layers=False), dict(qkv_bias=True, tie_embeddings=True)])
def test_transposed_kernels_give_the_same_logits(base_params, base_logits, changes):
  """CPU decoding's kernel layout ([out..., in...]): the params transposed by
  transpose_kernels have the transposed model's own shapes and logical axes, and it
  computes the same logits."""
  config = variant(**changes)
  if config.qkv_bias:  # other params than the base model's
    params = host_params(config)
    want = logits_of(config, params)
  else:
    params, want = (base_params if config.scan_layers else unstack_layers(base_params)), base_logits
  model, transposed = transpose_kernels(Transformer(config), params)
  assert model.config == dataclasses.replace(config, transposed_kernels=True)
  boxed = boxed_abstract_params(model.config)
  assert jax.tree.map(np.shape, transposed) == jax.tree.map(np.shape, nn.meta.unbox(boxed))
  o_proj = (
      boxed["layers"]["attn"]["o_proj"]["kernel"]
      if config.scan_layers
      else boxed["layers_0"]["attn"]["o_proj"]["kernel"]
  )
  assert o_proj.names[-3:] == ("embed", "heads", "head_dim")
  np.testing.assert_allclose(logits_of(model.config, transposed), want, rtol=1e-5, atol=1e-5)
  assert transpose_kernels(model, transposed)[1] is transposed  # already in the layout


@pytest.fixture(scope="module")
def no_remat_loss_and_grads(base_params):
  return compiled_loss_and_grads(BASE)(base_params, *packed_inputs())


def all_eqns(jaxpr):
  """Every equation of a jaxpr, including those inside scan / remat / jit bodies."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from all_eqns(inner)


def remat_policies_in(jaxpr, found):
  """Policies of every remat (checkpoint) in a jaxpr, looking inside scan bodies."""
  found.extend(e.params.get("policy") for e in all_eqns(jaxpr) if e.primitive.name in ("checkpoint", "remat", "remat2"))
  return found


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_policy_reaches_every_layer(base_params, policy, scan):
  config = variant(remat_policy=policy, scan_layers=scan)
  params = base_params if scan else unstack_layers(base_params)
  jaxpr = jax.make_jaxpr(compiled_loss_and_grads(config))(params, *packed_inputs()).jaxpr
  found = remat_policies_in(jaxpr, [])
  if policy == "none":
    assert found == []
  else:  # scanned: one remat around the layer body; unrolled: one per layer
    assert found == [REMAT_POLICIES[policy]] * (1 if scan else BASE.num_layers)


# Compiling a gradient costs seconds, so value equality runs on two representative cases.
@pytest.mark.parametrize("policy, scan", [("full", True), ("dots_no_batch", False)])
def test_remat_gives_the_same_loss_and_grads_as_no_remat(base_params, no_remat_loss_and_grads, policy, scan):
  config = variant(remat_policy=policy, scan_layers=scan)
  params = base_params if scan else unstack_layers(base_params)
  loss, grads = compiled_loss_and_grads(config)(params, *packed_inputs())
  want_loss, want_grads = no_remat_loss_and_grads
  if not scan:
    want_grads = unstack_layers(want_grads)
  # Remat and scan recompute the same float32 ops, possibly grouped differently by XLA.
  rtol = float32_tolerance.reorder_rtol(BASE.num_layers, BATCH * LENGTH)
  np.testing.assert_allclose(loss, want_loss, rtol=rtol)
  # Also asserts every parameter gets a gradient.
  float32_tolerance.assert_gradients_close(grads, want_grads, rtol, f"remat={policy} scan={scan}")


# ------------------------------------------------------------------------------ attention heads
def test_the_compiled_gradient_computes_no_cos_or_sin(base_params):
  """RoPE's cos and sin are constants of the program, gathered by position: XLA recomputed
  them in every layer's rope, forward and backward, when the program computed them."""
  tokens, positions, segments, targets, weights = packed_inputs()
  hlo = compiled_loss_and_grads(BASE).lower(base_params, tokens, positions, segments, targets, weights)
  text = hlo.compile().as_text()
  assert " cosine(" not in text and " sine(" not in text


def test_a_position_past_the_rope_table_gives_nan_not_a_wrong_angle(base_params):
  tokens, positions, segments, _, _ = packed_inputs()
  positions = positions.copy()
  positions[0, 3] = LENGTH  # tables cover positions 0 .. LENGTH - 1 of a row
  logits = np.asarray(compiled_forward(BASE)(base_params, tokens, positions, segments))
  assert np.isnan(logits[0, 3]).all() and np.isfinite(logits[1]).all()


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(base_params, base_logits):
  mha = variant(num_kv_heads=BASE.num_heads)
  group = BASE.num_heads // BASE.num_kv_heads
  params = jax.tree.map(lambda x: x, base_params)
  attn = dict(params["layers"]["attn"])
  for name in ("k_proj", "v_proj"):  # kernel (layers, embed, kv_heads, head_dim)
    attn[name] = {"kernel": np.repeat(attn[name]["kernel"], group, axis=2)}
  params["layers"] = dict(params["layers"], attn=attn)
  np.testing.assert_allclose(logits_of(mha, params), base_logits, rtol=1e-5, atol=1e-5)


def test_qkv_bias_is_added_to_q_k_and_v_only(base_params, base_logits):
  config = variant(qkv_bias=True)
  abstract = nn.meta.unbox(boxed_abstract_params(config))["layers"]["attn"]
  assert abstract["q_proj"]["bias"].shape == (BASE.num_layers, BASE.num_heads, BASE.head_dim)
  assert abstract["k_proj"]["bias"].shape == (BASE.num_layers, BASE.num_kv_heads, BASE.head_dim)
  assert abstract["v_proj"]["bias"].shape == (BASE.num_layers, BASE.num_kv_heads, BASE.head_dim)
  assert "bias" not in abstract["o_proj"]
  params = jax.tree.map(lambda x: x, base_params)
  attn = {name: dict(p) for name, p in params["layers"]["attn"].items()}
  for name, heads in (("q_proj", BASE.num_heads), ("k_proj", BASE.num_kv_heads), ("v_proj", BASE.num_kv_heads)):
    attn[name]["bias"] = np.zeros((BASE.num_layers, heads, BASE.head_dim), np.float32)
  params["layers"] = dict(params["layers"], attn=attn)
  # Zero biases: the plain model. A bias on any one of q, k, v changes the logits.
  np.testing.assert_allclose(logits_of(config, params), base_logits, rtol=1e-6, atol=1e-6)
  for name in ("q_proj", "k_proj", "v_proj"):
    attn[name]["bias"] = np.full_like(attn[name]["bias"], 0.5)
    assert np.abs(logits_of(config, params) - base_logits).max() > 1e-3, name
    attn[name]["bias"] = np.zeros_like(attn[name]["bias"])


def test_tied_embeddings_use_the_embedding_as_output_head(base_params, base_logits):
  tied = variant(tie_embeddings=True)
  params = {k: v for k, v in base_params.items() if k != "lm_head"}
  assert jax.tree.structure(params) == jax.tree.structure(host_params(tied))
  untied = dict(base_params, lm_head={"kernel": np.ascontiguousarray(base_params["embed"]["embedding"].T)})
  np.testing.assert_allclose(logits_of(tied, params), logits_of(BASE, untied), rtol=1e-5, atol=1e-5)


def test_bf16_compute_runs_and_stays_close_to_float32(base_params, base_logits):
  config = variant(dtype="bfloat16")
  got = logits_of(config, base_params)  # float32 logits, float32 params
  assert not np.array_equal(got, base_logits)  # bf16 really was used
  error = np.abs(got - base_logits).max() / np.abs(base_logits).max()
  assert error < 0.05, error
  assert np.mean(got.argmax(-1) == base_logits.argmax(-1)) > 0.9


def test_param_dtype_sets_the_dtype_of_every_parameter():
  abstract = nn.meta.unbox(boxed_abstract_params(variant(param_dtype="bfloat16", qkv_bias=True)))
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("stddev", [0.02, 0.08])
def test_initializer_range_is_the_stddev_of_every_initialised_weight(stddev):
  config = variant(hidden_size=64, intermediate_size=128, vocab_size=256, initializer_range=stddev)
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = Transformer(config).init(jax.random.key(0), dummy, dummy, dummy + 1)["params"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
    else:
      assert abs(float(jnp.std(leaf)) / stddev - 1) < 0.1, name


# ------------------------------------------------------------------------------ logical axes
CONFIGS = {
    "base": BASE,
    "unrolled": variant(scan_layers=False),
    "qkv_bias_tied": variant(qkv_bias=True, tie_embeddings=True),
    "remat": variant(remat_policy="full"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_parameter_has_logical_axis_names_known_to_the_rules(name):
  boxed = boxed_abstract_params(CONFIGS[name])
  rule_names = {logical for logical, _ in sharding.LOGICAL_RULES}
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
    assert len(leaf.names) == len(leaf.value.shape), where
    assert all(n in rule_names for n in leaf.names), f"{where}: {leaf.names}"
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert all(len(spec) > 0 for spec in specs)  # an un-annotated array would give P()


def sharding_constraints(jaxpr, found):
  """(spec, shape) of every sharding_constraint, looking inside scan/remat bodies."""
  found.extend(
      (e.params["sharding"].spec, tuple(e.invars[0].aval.shape))
      for e in all_eqns(jaxpr)
      if e.primitive.name == "sharding_constraint"
  )
  return found


@pytest.mark.parametrize("scan", [True, False])
def test_activations_are_constrained_under_the_logical_rules(scan):
  config = variant(scan_layers=scan)
  params = nn.meta.unbox(boxed_abstract_params(config))
  tokens, positions, segments, _, _ = packed_inputs()
  model = Transformer(config)
  forward = lambda p: model.apply({"params": p}, tokens, positions, segments)[0]
  assert sharding_constraints(jax.make_jaxpr(forward)(params).jaxpr, []) == []  # no rules: no-op
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    found = sharding_constraints(jax.make_jaxpr(forward)(params).jaxpr, [])
  batch = ("data", "fsdp")
  specs = {(tuple(spec), shape) for spec, shape in found}
  expected = {
      ((batch, None, None), (BATCH, LENGTH, BASE.hidden_size)),  # embeddings, residual stream
      ((batch, None, "tensor", None), (BATCH, LENGTH, BASE.num_heads, BASE.head_dim)),  # q, attn out
      ((batch, None, "tensor", None), (BATCH, LENGTH, BASE.num_kv_heads, BASE.head_dim)),  # k, v
      ((batch, None, "tensor"), (BATCH, LENGTH, BASE.intermediate_size)),  # MLP hidden
      ((batch, None, "tensor"), (BATCH, LENGTH, BASE.vocab_size)),  # logits
  }
  assert expected <= specs, expected - specs
  # Every layer's activations are constrained, not just the first.
  per_layer = sum(1 for _, shape in found if shape == (BATCH, LENGTH, BASE.intermediate_size))
  assert per_layer == (1 if scan else BASE.num_layers)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "changes", [{}, {"qkv_bias": True}, {"tie_embeddings": True}, {"num_kv_heads": 4, "intermediate_size": 48}]
)
def test_num_params_counts_the_parameters(changes):
  config = variant(**changes)
  abstract = nn.meta.unbox(boxed_abstract_params(config))
  assert config.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_kv_heads": 3}, "num_heads=4 must be a multiple of model.num_kv_heads=3"),
        ({"head_dim": 7}, "head_dim=7 must be even"),
        ({"remat_policy": "some"}, "model.remat_policy='some'"),
        ({"attention_impl": "flash"}, "model.attention_impl='flash'"),
        ({"rope_scaling_type": "yarn"}, "model.rope_scaling_type='yarn'"),
        ({"initializer_range": 0.0}, "model.initializer_range=0.0 must be > 0"),
    ],
)
def test_bad_model_config_fails_naming_the_key(changes, message):
  with pytest.raises(ValueError, match=message):
    variant(**changes)


def test_from_config_reads_the_config_file_keys():
  model_config = base.get_config().model
  config = ModelConfig.from_config(model_config)  # keys such as init_from are not the model's
  assert config.hidden_size == model_config.hidden_size
  assert config.num_kv_heads == model_config.num_kv_heads
  assert config.scan_layers is True and config.remat_policy == "none"
