"""Causal, segment-aware attention: a packed row behaves like separate examples.

The model-level tests run one compiled forward pass over a batch whose rows are variants of
one packed row (three examples plus padding): the base row, the row with one example's
tokens changed, each example alone, and rows without segment ids (to show the checks
would catch attention that crosses examples).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cftjax import attention, model as model_lib
from cftjax.model import ModelConfig, Transformer
from random_params import draw_params

CONFIG = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
)
LENGTH = 16
EXAMPLE_LENGTHS = (5, 6, 4)  # + 1 padding slot
SPANS = [slice(s, s + n) for s, n in zip(np.cumsum((0,) + EXAMPLE_LENGTHS[:-1]), EXAMPLE_LENGTHS)]
PAD_START = sum(EXAMPLE_LENGTHS)


def host_params(model: Transformer, seed: int):
  """Random params of the model's shapes, drawn on the host (no compiled init needed).

  Larger than the 0.02 init so attention patterns are far from uniform and any leak
  between examples shows in the logits.
  """
  return draw_params(nn.meta.unbox(jax.eval_shape(model_lib.params_init_fn(model))), seed)


class Rows:
  """Builds the batch of row variants and remembers which row is which."""

  def __init__(self, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.examples = [rng.integers(1, CONFIG.vocab_size, n) for n in EXAMPLE_LENGTHS]
    self.changed = [rng.integers(1, CONFIG.vocab_size, n) for n in EXAMPLE_LENGTHS]
    self.tokens, self.positions, self.segments, self.names = [], [], [], []

  def add(self, name, tokens, positions, segments):
    self.names.append(name)
    self.tokens.append(tokens)
    self.positions.append(positions)
    self.segments.append(segments)

  def packed(self, examples):
    tokens = np.zeros(LENGTH, np.int32)
    positions = np.zeros(LENGTH, np.int32)
    segments = np.zeros(LENGTH, np.int32)
    for i, (span, ids) in enumerate(zip(SPANS, examples)):
      tokens[span], positions[span], segments[span] = ids, np.arange(len(ids)), i + 1
    return tokens, positions, segments

  def alone(self, ids, offset=0):
    tokens = np.zeros(LENGTH, np.int32)
    positions = np.zeros(LENGTH, np.int32)
    segments = np.zeros(LENGTH, np.int32)
    span = slice(offset, offset + len(ids))
    tokens[span], positions[span], segments[span] = ids, np.arange(len(ids)), 1
    return tokens, positions, segments

  def arrays(self):
    return tuple(jnp.asarray(np.stack(x)) for x in (self.tokens, self.positions, self.segments))


def build_rows() -> Rows:
  rows = Rows()
  ex, ch = rows.examples, rows.changed
  rows.add("base", *rows.packed(ex))
  for i in range(3):
    rows.add(f"changed_{i}", *rows.packed([ch[j] if j == i else ex[j] for j in range(3)]))
    rows.add(f"alone_{i}", *rows.alone(ex[i]))
  last_changed = ex[1].copy()
  last_changed[-1] = (last_changed[-1] % (CONFIG.vocab_size - 1)) + 1
  rows.add("last_token_of_1_changed", *rows.packed([ex[0], last_changed, ex[2]]))
  # Left padding: three padding slots before the example.
  rows.add("left_padded_0", *rows.alone(ex[0], offset=3))
  rows.add("all_padding", np.zeros(LENGTH, np.int32), np.zeros(LENGTH, np.int32), np.zeros(LENGTH, np.int32))
  # The same tokens read as one long example (positions 0..L-1, one segment).
  for name in ("base", "changed_0"):
    tokens = rows.tokens[rows.names.index(name)]
    rows.add(f"unsegmented_{name}", tokens, np.arange(LENGTH, dtype=np.int32), np.ones(LENGTH, np.int32))
  return rows


@pytest.fixture(scope="module")
def logits():
  """name -> float32 logits [L, V] for each row variant, from one compiled forward."""
  model = Transformer(CONFIG)
  params = host_params(model, seed=1)
  rows = build_rows()
  out, _ = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *rows.arrays())
  out = np.asarray(out)
  return {name: out[i] for i, name in enumerate(rows.names)}


# ------------------------------------------------------------------------------ mask
def test_mask_allows_exactly_same_segment_and_not_future():
  segments = jnp.asarray([[1, 1, 2, 2, 0]])
  slots = jnp.arange(5)
  mask = np.asarray(attention.attention_mask(segments, segments, slots[None], slots))
  expected = np.array(
      [
          [1, 0, 0, 0, 0],
          [1, 1, 0, 0, 0],
          [0, 0, 1, 0, 0],
          [0, 0, 1, 1, 0],
          [0, 0, 0, 0, 1],  # padding sees only padding: never an empty softmax row
      ],
      bool,
  )
  assert mask.shape == (1, 1, 5, 5)
  np.testing.assert_array_equal(mask[0, 0], expected)


# ------------------------------------------------------------------------------ packed rows
@pytest.mark.parametrize("changed", range(3))
def test_changing_one_example_leaves_the_other_examples_logits_unchanged(logits, changed):
  for i, span in enumerate(SPANS):
    base, other = logits["base"][span], logits[f"changed_{changed}"][span]
    if i == changed:
      assert np.abs(base - other).max() > 1e-2  # the changed example did change
    else:
      np.testing.assert_allclose(other, base, rtol=0, atol=1e-6, err_msg=f"example {i}")


def test_without_segment_ids_the_check_above_would_see_the_leak(logits):
  # Sanity of the test itself: in one long segment, example 0's tokens reach the others.
  later = slice(SPANS[1].start, PAD_START)
  leak = np.abs(logits["unsegmented_base"][later] - logits["unsegmented_changed_0"][later]).max()
  assert leak > 1e-2


@pytest.mark.parametrize("example", range(3))
def test_each_packed_example_has_the_logits_it_has_alone(logits, example):
  span = SPANS[example]
  alone = logits[f"alone_{example}"][: span.stop - span.start]
  np.testing.assert_allclose(logits["base"][span], alone, rtol=0, atol=1e-5)


def test_attention_is_causal_inside_an_example(logits):
  # Changing the last token of example 1 changes only that position's logits.
  base, changed = logits["base"], logits["last_token_of_1_changed"]
  last = SPANS[1].stop - 1
  np.testing.assert_allclose(changed[:last], base[:last], rtol=0, atol=1e-6)
  np.testing.assert_allclose(changed[last + 1 :], base[last + 1 :], rtol=0, atol=1e-6)
  assert np.abs(changed[last] - base[last]).max() > 1e-2


def test_padding_produces_no_nan_and_does_not_disturb_real_tokens(logits):
  for name, row in logits.items():
    assert np.isfinite(row).all(), name
  # An example after left padding scores as it does at the start of a row.
  n = EXAMPLE_LENGTHS[0]
  np.testing.assert_allclose(logits["left_padded_0"][3 : 3 + n], logits["alone_0"][:n], rtol=0, atol=1e-5)


def test_sliding_window_keeps_exactly_the_last_window_keys():
  slots = jnp.arange(8)
  segments = jnp.asarray([[1, 1, 1, 1, 1, 1, 2, 2]])
  mask = np.asarray(attention.attention_mask(segments, segments, slots[None], slots, window=3))[0, 0]
  for q in range(8):
    for k in range(8):
      assert mask[q, k] == (segments[0, q] == segments[0, k] and 0 <= q - k < 3), (q, k)


# ------------------------------------------------------------------------------ kernels
def reference_attention(q, k, v, mask):
  """numpy softmax attention with k/v heads repeated to the query heads (HF repeat_kv)."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", probs, v)


@jax.jit
def packed_attention(q, k, v, segments):
  slots = jnp.arange(q.shape[1])
  mask = attention.attention_mask(segments, segments, jnp.broadcast_to(slots, segments.shape), slots)
  return attention.dot_product_attention(q, k, v, mask), mask


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_attention_equals_repeated_kv_heads(num_kv_heads):
  rng = np.random.default_rng(num_kv_heads)
  group = 4 // num_kv_heads
  q = rng.standard_normal((2, 6, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 6, num_kv_heads, 8)).astype(np.float32)
  v = rng.standard_normal((2, 6, num_kv_heads, 8)).astype(np.float32)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  got, mask = packed_attention(q, k, v, segments)
  tolerance = attention_reordering_tolerance(q, np.repeat(k, group, 2), np.repeat(v, group, 2))
  np.testing.assert_allclose(got, reference_attention(q, k, v, np.asarray(mask)), rtol=0, atol=tolerance)
  repeated, _ = packed_attention(q, np.repeat(k, group, 2), np.repeat(v, group, 2), segments)
  np.testing.assert_allclose(got, repeated, rtol=0, atol=tolerance)


def attention_reordering_tolerance(q, k, v):
  """How far two float32 attentions that sum in different orders may differ.

  A sum of n terms, reordered, moves by at most n * eps * sum|terms| (worst case). Scores
  (sums over head_dim D, scaled by 1/sqrt(D)) move by ds <= D * eps * max sum_d |q_d k_d| / sqrt(D),
  for each of the two sides; softmax turns that into sum_j |dp_j| <= 2 * max |ds|; the output
  sum_j p_j v_j (L keys) adds L * eps * max|v| of its own. Twice the total covers the
  exp/divide roundings of each side.
  """
  eps = float(np.finfo(np.float32).eps)
  depth, length = q.shape[-1], k.shape[1]
  magnitude = np.einsum("bqnh,bknh->bnqk", np.abs(q), np.abs(k)).max() / np.sqrt(depth)
  score_error = 2 * depth * eps * magnitude
  return 2 * float(np.abs(v).max()) * (2 * score_error + length * eps)


def test_attention_rejects_bad_head_counts_and_unknown_impl():
  q = jnp.zeros((1, 2, 3, 4))
  kv = jnp.zeros((1, 2, 2, 4))
  mask = jnp.ones((1, 1, 2, 2), bool)
  with pytest.raises(ValueError, match="num_heads=3 is not a multiple of num_kv_heads=2"):
    attention.dot_product_attention(q, kv, kv, mask)
  with pytest.raises(ValueError, match="model.attention_impl='flash'"):
    attention.dot_product_attention(q, q, q, mask, impl="flash")


# ------------------------------------------------------------------------------ splash
SPLASH_LENGTH = 256  # two 128-token tiles, so some tiles are skipped, others partly masked


def packed_segments(batch: int, length: int, seed: int) -> np.ndarray:
  """Rows of several examples of random lengths, then padding (segment 0)."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((batch, length), np.int32)
  for row in rows:
    start, segment = 0, 1
    while start < length - 20:
      n = int(rng.integers(10, 150))
      row[start : start + n] = segment
      start, segment = min(start + n, length), segment + 1
    row[start:] = 0 if rng.random() < 0.5 else segment - 1  # padding, or the last example runs on
  return rows


def attention_loss(impl, window=0):
  def loss(q, k, v, segments, cotangent):
    mask = attention.self_attention_mask(segments, impl, window)
    return jnp.sum(attention.dot_product_attention(q, k, v, mask, impl) * cotangent)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("num_kv_heads, window", [(1, 0), (2, 0), (2, 40)])
def test_splash_kernel_equals_xla_attention_values_and_gradients(num_kv_heads, window):
  rng = np.random.default_rng(num_kv_heads)
  shape = (2, SPLASH_LENGTH, 4, 64)
  q = rng.standard_normal(shape).astype(np.float32)
  k, v = (rng.standard_normal(shape[:2] + (num_kv_heads, 64)).astype(np.float32) for _ in range(2))
  segments, cotangent = packed_segments(2, SPLASH_LENGTH, seed=3), rng.standard_normal(shape).astype(np.float32)
  (want, want_grads), (got, got_grads) = (
      attention_loss(impl, window)(q, k, v, segments, cotangent) for impl in ("xla", "splash")
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_splash_refuses_lengths_that_do_not_tile():
  q = jnp.zeros((1, 200, 2, 64))
  with pytest.raises(ValueError, match="multiple of 128.*got 200 \\(data.max_length\\)"):
    attention.dot_product_attention(q, q, q, attention.CausalSegments(jnp.ones((1, 200), jnp.int32)), "splash")


@pytest.mark.parametrize(
    "backend, length, expected", [("cpu", 256, "xla"), ("tpu", 256, "splash"), ("tpu", 200, "xla")]
)
def test_auto_takes_splash_on_tpu_where_the_length_tiles(backend, length, expected, monkeypatch):
  monkeypatch.setattr(attention.jax, "default_backend", lambda: backend)
  q = jnp.zeros((1, length, 2, 64))
  mask = attention.self_attention_mask(jnp.ones((1, length), jnp.int32), "auto")
  jaxpr = str(jax.make_jaxpr(lambda q: attention.dot_product_attention(q, q, q, mask, "auto"))(q))
  assert ("pallas_call" in jaxpr) == (expected == "splash")
  if backend == "cpu":
    xla = attention.dot_product_attention(q + 1, q, q, mask.dense(), "xla")
    np.testing.assert_array_equal(attention.dot_product_attention(q + 1, q, q, mask, "auto"), xla)


def test_splash_model_sharded_over_a_mesh_equals_xla_on_one_device():
  """The kernel runs per shard (shard_map) with batch over data x fsdp and heads over tensor;
  num_kv_heads=1 does not divide tensor=2, so key/value heads stay whole there. The splash
  model also scans and rematerialises its layers, as the 7B configs do."""
  from cftjax import sharding

  outputs = {}
  for impl, kv_heads in (("xla", 2), ("splash", 2), ("xla", 1), ("splash", 1)):
    config = dataclasses.replace(
        CONFIG,
        head_dim=64,
        num_kv_heads=kv_heads,
        attention_impl=impl,
        remat_policy="dots_no_batch" if impl == "splash" else "none",
    )
    model = Transformer(config)
    params = host_params(model, seed=kv_heads)
    segments = packed_segments(4, SPLASH_LENGTH, seed=5)
    tokens = np.random.default_rng(0).integers(1, CONFIG.vocab_size, segments.shape).astype(np.int32)
    positions = np.zeros_like(segments)
    for row, seg in zip(positions, segments):
      for sid in np.unique(seg):
        row[seg == sid] = np.arange(np.sum(seg == sid))

    def loss(params):
      logits, _ = model.apply({"params": params}, tokens, positions, segments)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (segments > 0)), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if impl == "splash":
      mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
      with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        outputs[impl, kv_heads] = jax.device_get(step(params))
    else:
      outputs[impl, kv_heads] = jax.device_get(step(params))
  for kv_heads in (1, 2):
    (want_loss, want_logits), want_grads = outputs["xla", kv_heads]
    (got_loss, got_logits), got_grads = outputs["splash", kv_heads]
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4), got_grads, want_grads)


# ------------------------------------------------------------------------------ RoPE
def reference_rope(x, positions, theta):
  """Hugging Face rotate_half RoPE in numpy."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  angles = positions[..., None] * inv_freq
  angles = np.concatenate([angles, angles], -1)[:, :, None, :]
  rotated = np.concatenate([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], -1)
  return x * np.cos(angles) + rotated * np.sin(angles)


def test_rope_matches_the_reference_and_depends_only_on_relative_position():
  config = ModelConfig(
      vocab_size=8,
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      num_kv_heads=2,
      head_dim=8,
      intermediate_size=16,
      rope_theta=500.0,
  )
  inv_freq = model_lib.rope_inverse_frequencies(config)
  rope = jax.jit(lambda x, positions: model_lib.apply_rope(x, model_lib.rope_tables(positions, inv_freq, 64)))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 2, 8)).astype(np.float32)
  positions = np.asarray([[0, 1, 7, 30]], np.int32)
  got = np.asarray(rope(x, positions))
  np.testing.assert_allclose(got, reference_rope(x, positions, 500.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, 0], x[:, 0], atol=1e-7)  # position 0: identity
  # <rope(q, m), rope(k, n)> depends on m - n only: shifting both positions keeps scores.
  shifted = np.asarray(rope(x, positions + 11))
  scores = np.einsum("bqnh,bknh->bnqk", got, got)
  np.testing.assert_allclose(np.einsum("bqnh,bknh->bnqk", shifted, shifted), scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, length, block, window",
    [(4, 2, 96, 32, 0), (3, 1, 100, 32, 0), (4, 4, 96, 96, 0), (4, 2, 96, 16, 24), (2, 1, 70, 32, 40)],
)
@pytest.mark.parametrize("scanned", [False, True])
def test_blocked_causal_attention_equals_dense_xla_attention(
    num_heads, num_kv_heads, length, block, window, scanned, monkeypatch
):
  """Self-attention in query blocks (CPU) skips keys no row of a block may see; values and
  gradients equal the dense-mask attention on packed rows, with GQA/MQA, a length that is not
  a multiple of the block and sliding windows; also as the rematerialised scan long rows take."""
  if scanned:
    monkeypatch.setattr(attention, "CPU_SCAN_LENGTH", 0)
  rng = np.random.default_rng(length + block)
  q = rng.standard_normal((3, length, num_heads, 16)).astype(np.float32)
  k, v = (rng.standard_normal((3, length, num_kv_heads, 16)).astype(np.float32) for _ in range(2))
  segments = packed_segments(3, length, seed=block)
  cotangent = rng.standard_normal(q.shape).astype(np.float32)

  def attend(blocked):
    def f(q, k, v):
      mask = attention.CausalSegments(jnp.asarray(segments), window)
      return (
          attention._xla_causal_attention(q, k, v, mask, block)
          if blocked
          else attention._xla_attention(q, k, v, mask.dense())
      )

    grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cotangent), argnums=(0, 1, 2))
    return jax.jit(f)(q, k, v), jax.jit(grads)(q, k, v)

  (want, want_grads), (got, got_grads) = attend(False), attend(True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_xla_self_attention_runs_in_blocks_on_cpu(monkeypatch):
  """The model's xla path takes the segment ids, not a dense mask, and splits the queries into
  CPU_CAUSAL_BLOCK rows on CPU (one block elsewhere)."""
  monkeypatch.setattr(attention, "CPU_CAUSAL_BLOCK", 32)
  mask = attention.self_attention_mask(jnp.ones((1, 96), jnp.int32), "xla")
  assert isinstance(mask, attention.CausalSegments)
  q = jnp.zeros((1, 96, 2, 8))
  dots = lambda: str(jax.make_jaxpr(lambda q: attention.dot_product_attention(q, q, q, mask, "xla"))(q)).count(
      "dot_general"
  )
  assert dots() == 2 * 3
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  assert dots() == 2


def test_long_rows_keep_one_blocks_scores_live_in_the_backward_pass(monkeypatch):
  """Long rows scan their blocks with the scores rematerialised: the compiled gradient's
  temporaries stay under the [heads, L, L] causal probabilities, which the unrolled blocks
  keep more than twice over."""
  length, heads = 1024, 4
  q = jnp.zeros((1, length, heads, 16))
  mask = attention.CausalSegments(jnp.ones((1, length), jnp.int32))
  loss = lambda q: jnp.sum(attention._xla_causal_attention(q, q, q, mask, 64) ** 2)

  def temporaries():
    return jax.jit(jax.grad(loss)).lower(q).compile().memory_analysis().temp_size_in_bytes

  probs_bytes = heads * length * length * 4 // 2  # the causal half, float32
  unrolled = temporaries()
  monkeypatch.setattr(attention, "CPU_SCAN_LENGTH", 512)
  scanned = temporaries()
  assert scanned < probs_bytes < unrolled / 2, (scanned, probs_bytes, unrolled)
