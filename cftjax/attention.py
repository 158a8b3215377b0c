"""Causal, segment-aware grouped-query attention.

One rule covers training on packed rows and cached decoding: query i may attend to key j
exactly when both carry the same segment id and j's slot index is not after i's. Packing
gives every example its own segment id (0 = padding), so no token ever sees another
example; decoding gives real cache slots id 1 and padded slots id 0.
"""

from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn"]
ATTENTION_IMPLS = ("xla", "cudnn")


def attention_mask(
    q_segment_ids_BxQ: jax.Array,
    kv_segment_ids_BxK: jax.Array,
    q_slots_BxQ: jax.Array,
    kv_slots_K: jax.Array,
) -> jax.Array:
  """Boolean [B, 1, Q, K] mask: same segment and key slot <= query slot."""
  same_segment = q_segment_ids_BxQ[:, :, None] == kv_segment_ids_BxK[:, None, :]
  causal = kv_slots_K[None, None, :] <= q_slots_BxQ[:, :, None]
  return (same_segment & causal)[:, None, :, :]


def _xla_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask_Bx1xQxK):
  """Plain XLA attention; GQA by grouping query heads onto their key/value head."""
  batch, q_len, num_heads, head_dim = q_BxQxNxH.shape
  num_kv_heads = k_BxKxMxH.shape[2]
  group = num_heads // num_kv_heads
  q = q_BxQxNxH.reshape(batch, q_len, num_kv_heads, group, head_dim)
  # Scores and softmax in float32 whatever the compute dtype: bf16 logits lose the mask.
  scores = jnp.einsum(
      "bqmgh,bkmh->bmgqk", q, k_BxKxMxH, preferred_element_type=jnp.float32
  ) * (head_dim**-0.5)
  mask = mask_Bx1xQxK[:, :, None, :, :]  # broadcast over kv heads and group
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxMxH.dtype)
  out = jnp.einsum("bmgqk,bkmh->bqmgh", probs, v_BxKxMxH)
  return out.reshape(batch, q_len, num_heads, head_dim)


def dot_product_attention(
    q_BxQxNxH: jax.Array,
    k_BxKxMxH: jax.Array,
    v_BxKxMxH: jax.Array,
    mask_Bx1xQxK: jax.Array,
    impl: AttentionImpl = "xla",
) -> jax.Array:
  """Attention with N query heads over M key/value heads (N % M == 0)."""
  if q_BxQxNxH.shape[2] % k_BxKxMxH.shape[2]:
    raise ValueError(
        f"num_heads={q_BxQxNxH.shape[2]} is not a multiple of "
        f"num_kv_heads={k_BxKxMxH.shape[2]}"
    )
  if impl == "xla":
    return _xla_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask_Bx1xQxK)
  if impl == "cudnn":
    # cuDNN flash attention (GPU, bf16/fp16); handles GQA and an explicit mask.
    return jax.nn.dot_product_attention(
        q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask=mask_Bx1xQxK, implementation="cudnn"
    )
  raise ValueError(
      f"config key model.attention_impl={impl!r} is not one of {ATTENTION_IMPLS}"
  )
