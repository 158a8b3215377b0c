"""The output head and the token cross entropy, over chunks of sequence positions.

The full path materialises float32 logits [B, L, V]: 5 GB for two rows of 4096 tokens at
Qwen's 152064-token vocabulary, and the backward pass holds more of the same size. Here a
scan walks the sequence in chunks of `chunk_size` positions; each step multiplies its
hidden states by the head in the compute dtype (float32 accumulation), takes a float32
log-sum-exp and keeps only the per-token losses. The body is rematerialised, so the
backward pass recomputes one chunk's logits at a time instead of saving them all: peak
logits memory is [B, chunk_size, V] in both directions.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def head_kernel(params: Any, tie_embeddings: bool) -> jax.Array:
  """The head as a [D, V] matrix: the untied `lm_head` kernel or the transposed embedding."""
  if tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def chunked_token_cross_entropy(
    hidden_BxLxD: jax.Array,
    kernel_DxV: jax.Array,
    targets_BxL: jax.Array,
    chunk_size: int,
    dtype=jnp.float32,
) -> jax.Array:
  """Per-token cross entropy [B, L] (float32) of logits = hidden @ kernel, chunk by chunk.

  A length that `chunk_size` does not divide is padded; the padded positions' losses are
  dropped before they are returned, so they carry no gradient.
  """
  if chunk_size <= 0:
    raise ValueError(f"chunk_size={chunk_size} must be positive (config key model.loss_chunk_size)")
  batch, length, width = hidden_BxLxD.shape
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  if pad:
    hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
  # [num_chunks, B, chunk, ...]: rows stay the sharded leading dimension of every chunk.
  hidden_NxBxCxD = hidden_BxLxD.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
  targets_NxBxC = targets_BxL.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_losses(h_BxCxD, t_BxC):
    # Cast inside the body: the kernel's cotangent then adds up over chunks in its own
    # (float32 master) dtype rather than in the compute dtype.
    logits_BxCxV = jax.lax.dot_general(
        h_BxCxD.astype(dtype),
        kernel_DxV.astype(dtype),
        (((2,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    logits_BxCxV = nn.with_logical_constraint(logits_BxCxV, ("act_batch", "act_length", "act_vocab"))
    log_normalizer = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logits = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    return log_normalizer - target_logits

  def body(carry, xs):
    return carry, chunk_losses(*xs)

  _, ce_NxBxC = jax.lax.scan(body, None, (hidden_NxBxCxD, targets_NxBxC))
  return ce_NxBxC.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
