"""The chunked head + cross entropy equals the full-logits path: loss and gradients.

Tolerances are derived, not observed. The two paths compute the same float32 numbers in
different association orders: a logit is one dot product over D terms either way, but XLA
may block it differently for a [B*C, D] than a [B*L, D] operand, and sums over tokens
associate differently. For a sum of k float32 terms, any two orders differ by at most
2 * gamma_k * sum|terms| with gamma_k = k*eps / (1 - k*eps) (Higham, Accuracy and
Stability, 3.1). Cross entropy is 1-Lipschitz in each logit under the max norm (the
log-sum-exp and the target logit each move at most as much as the largest logit change),
and softmax moves by at most the largest logit change too, which bounds the gradients.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cftjax import head_loss, objectives, train
from cftjax.data.batch import TokenBatch
from configs import demo

EPS = float(np.finfo(np.float32).eps)


def gamma(k: int) -> float:
  return k * EPS / (1 - k * EPS)


def full_loss(hidden, kernel, targets, weights):
  logits = jnp.einsum("bld,dv->blv", hidden, kernel)
  return jnp.sum(objectives.token_cross_entropy(logits, targets) * weights)


def chunked_loss(hidden, kernel, targets, weights, chunk):
  return jnp.sum(head_loss.chunked_token_cross_entropy(hidden, kernel, targets, chunk) * weights)


def draw(batch=2, length=37, width=24, vocab=101, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
  kernel = (rng.normal(size=(width, vocab)) / np.sqrt(width)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  weights = (rng.random((batch, length)) < 0.7).astype(np.float32)
  return hidden, kernel, targets, weights


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])  # several chunks, padded, one, longer than L
def test_chunked_loss_and_gradients_equal_full(chunk):
  hidden, kernel, targets, weights = draw()
  batch, length, width = hidden.shape
  tokens = batch * length
  loss_f, (dh_f, dw_f) = jax.value_and_grad(full_loss, argnums=(0, 1))(hidden, kernel, targets, weights)
  loss_c, (dh_c, dw_c) = jax.value_and_grad(chunked_loss, argnums=(0, 1))(hidden, kernel, targets, weights, chunk)

  # Logit error per token: 2 gamma_D sum_d |h_d w_dv|, at most its max over v.
  abs_dot = np.einsum("bld,dv->blv", np.abs(hidden), np.abs(kernel))
  logit_err_BxL = 2 * gamma(width) * abs_dot.max(-1)
  ce = np.asarray(head_loss.chunked_token_cross_entropy(hidden, kernel, targets, chunk))
  # CE per token moves by <= 2 logit_err (log-sum-exp and target logit), plus its own
  # rounding over V terms; then the weighted sum over tokens associates differently.
  ce_err = 2 * logit_err_BxL + 2 * gamma(kernel.shape[1]) * (np.abs(ce) + 1)
  loss_bound = float(np.sum(weights * ce_err) + 2 * gamma(tokens) * np.sum(weights * np.abs(ce)))
  assert abs(float(loss_c) - float(loss_f)) <= loss_bound

  # dL/dlogits = w (softmax - onehot): each entry moves by <= w * 2 logit_err (softmax's
  # max-norm change for a max-norm logit change) plus rounding of entries bounded by 1.
  g_err_BxL = weights * (2 * logit_err_BxL + 4 * gamma(kernel.shape[1]))
  # dH = G W^T over V terms, |G| <= w.
  abs_w_rows = np.abs(kernel).sum(1)[None, None, :]
  dh_bound = (g_err_BxL[..., None] + 2 * gamma(kernel.shape[1]) * weights[..., None]) * abs_w_rows
  np.testing.assert_array_less(
      np.abs(np.asarray(dh_c) - np.asarray(dh_f)), np.broadcast_to(dh_bound, dh_f.shape) + 1e-30
  )
  # dW = H^T G over B*L terms.
  dw_bound = (
      np.einsum("bld,bl->d", np.abs(hidden), g_err_BxL)[:, None]
      + 2 * gamma(tokens) * np.einsum("bld,bl->d", np.abs(hidden), 2 * weights)[:, None]
  )
  np.testing.assert_array_less(
      np.abs(np.asarray(dw_c) - np.asarray(dw_f)), np.broadcast_to(dw_bound, dw_f.shape) + 1e-30
  )
  # The bound is not vacuous: two orders below the gradients' own size.
  assert dw_bound.max() < 1e-2 * np.abs(np.asarray(dw_f)).max()


def test_chunked_loss_never_builds_whole_logits():
  """Compiled temporaries stay near one chunk's logits, far below [B, L, V] float32."""
  batch, length, width, vocab = 2, 1024, 16, 8192
  hidden = jax.ShapeDtypeStruct((batch, length, width), jnp.float32)
  kernel = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
  targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  weights = jax.ShapeDtypeStruct((batch, length), jnp.float32)
  whole = batch * length * vocab * 4

  def temp_bytes(fn):
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    return grad.lower(hidden, kernel, targets, weights).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(full_loss) >= whole
  assert temp_bytes(functools.partial(chunked_loss, chunk=64)) < whole / 4


def test_train_forward_chunked_equals_full_with_tied_and_untied_heads():
  """Through the real model: loss sums and every parameter gradient agree.

  Upstream of the head both paths run the same program on hidden-state cotangents that
  differ by the head bound above (~1e-6 relative here); a 2-layer float32 model carries
  that through a few matmuls over <= 64 terms, so 1e-4 relative of the largest gradient
  leaves two orders of magnitude of margin over gamma_64 * (layers + 1).
  """
  config = demo.get_config()
  config.update_from_flattened_dict(
      {
          "model.vocab_size": 97,
          "model.hidden_size": 32,
          "model.num_layers": 2,
          "model.num_heads": 2,
          "model.num_kv_heads": 1,
          "model.head_dim": 16,
          "model.intermediate_size": 64,
      }
  )
  rng = np.random.default_rng(1)
  batch, length = 2, 24
  tokens = rng.integers(0, 97, size=(batch, length)).astype(np.int32)
  b = TokenBatch(
      inputs=tokens,
      targets=np.roll(tokens, -1, axis=1),
      positions=np.tile(np.arange(length), (batch, 1)),
      segment_ids=np.ones((batch, length), np.int32),
      weights=(rng.random((batch, length)) < 0.8).astype(np.float32),
      objective_ids=rng.integers(0, 2, size=(batch, length)).astype(np.int32),
      source_ids=np.zeros((batch, length), np.int32),
  )
  for tied in (False, True):
    config.model.tie_embeddings = tied
    results = {}
    for chunk in (0, 5):
      config.model.loss_chunk_size = chunk
      model, _ = train.build_model(config)
      params = nn.meta.unbox(train.init_params_fn(model, seed=3)())

      def loss(p):
        sums = train._forward_sums(model, p, b, num_sources=1)
        return sums["loss_sum"], sums

      results[chunk] = jax.jit(jax.grad(loss, has_aux=True))(params)
    (grads_f, sums_f), (grads_c, sums_c) = results[0], results[5]
    for key in sums_f:
      np.testing.assert_allclose(sums_c[key], sums_f[key], rtol=1e-5, err_msg=f"{key} tied={tied}")
    for (path, gf), gc in zip(jax.tree_util.tree_leaves_with_path(grads_f), jax.tree.leaves(grads_c)):
      scale = float(np.abs(gf).max())
      np.testing.assert_allclose(gc, gf, atol=1e-4 * scale, rtol=0, err_msg=f"{jax.tree_util.keystr(path)} tied={tied}")
