"""Causal, segment-aware grouped-query attention.

One rule covers training on packed rows and cached decoding: query i may attend to key j
exactly when both carry the same segment id and j's slot index is not after i's (and, with
a sliding window W as in Mistral, fewer than W slots before it). Packing gives every
example its own segment id (0 = padding), so no token ever sees another example; decoding
gives real cache slots id 1 and padded slots id 0.
"""

from typing import Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cftjax import sharding

AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
SPLASH_MAX_BLOCK = 512  # splash kernel tile along the sequence (q and kv)
# Query rows per block of XLA causal self-attention on CPU: each block scores only the keys
# up to its last row, skipping the masked upper triangle, and its [rows, keys] scores stay
# in cache. Accelerators take the whole row as one block.
CPU_CAUSAL_BLOCK = 128
# Longer rows run their blocks as a rematerialised scan (bounded memory, see _scanned_blocks).
CPU_SCAN_LENGTH = 2048


@flax.struct.dataclass
class CausalSegments:
  """Causal self-attention over packed rows, given by their segment ids [B, L] instead of a
  dense mask: what kernels that build the mask tile by tile take (splash, and XLA's blocked
  causal attention)."""

  segment_ids_BxL: jax.Array
  window: int = flax.struct.field(pytree_node=False, default=0)  # 0: no sliding window

  def dense(self) -> jax.Array:
    slots = jnp.arange(self.segment_ids_BxL.shape[1], dtype=jnp.int32)
    return attention_mask(
        self.segment_ids_BxL,
        self.segment_ids_BxL,
        jnp.broadcast_to(slots, self.segment_ids_BxL.shape),
        slots,
        self.window,
    )


def self_attention_mask(
    segment_ids_BxL: jax.Array, impl: AttentionImpl, window: int = 0
) -> "jax.Array | CausalSegments":
  """The mask of causal self-attention (training, scoring) in the form `impl` takes."""
  segments = CausalSegments(segment_ids_BxL, window)
  return segments if impl in ("splash", "auto", "xla") else segments.dense()


def _splash_block(length: int) -> int:
  """The splash tile for a sequence length, or 0 when the length does not tile."""
  block = min(SPLASH_MAX_BLOCK, length)
  return block if length % block == 0 and block % 128 == 0 else 0


def attention_mask(
    q_segment_ids_BxQ: jax.Array,
    kv_segment_ids_BxK: jax.Array,
    q_slots_BxQ: jax.Array,
    kv_slots_K: jax.Array,
    window: int = 0,
) -> jax.Array:
  """Boolean [B, 1, Q, K] mask: same segment, key slot <= query slot and, with a sliding
  window (window > 0), query slot - key slot < window."""
  same_segment = q_segment_ids_BxQ[:, :, None] == kv_segment_ids_BxK[:, None, :]
  behind = q_slots_BxQ[:, :, None] - kv_slots_K[None, None, :]
  allowed = same_segment & (behind >= 0)
  if window:
    allowed &= behind < window
  return allowed[:, None, :, :]


def _xla_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask_Bx1xQxK):
  """Plain XLA attention under a dense mask: `cached_attention` with keys and values put in
  its layouts."""
  return cached_attention(q_BxQxNxH, k_BxKxMxH.transpose(0, 2, 3, 1), v_BxKxMxH.transpose(0, 2, 1, 3), mask_Bx1xQxK)


def _causal_block(length: int) -> int:
  return min(CPU_CAUSAL_BLOCK, length) if jax.default_backend() == "cpu" else length


def _block_forward(q_BxMxRxGxH, k_BxMxKxH, v_BxMxKxH, mask_BxRxK):
  """R query rows of each (batch, kv head) against K keys, in one batched matmul per side;
  also returns what the backward pass reuses.

  The softmax is normalised after the value matmul, on the [Q, H] output, not on the
  [Q, K] weights (as flash attention does): the unnormalised exponentials feed the matmul
  and the backward pass, which saves writing and reading the probabilities.
  """
  batch, num_kv_heads, rows, group, head_dim = q_BxMxRxGxH.shape
  keys = k_BxMxKxH.shape[2]
  q_BxMxQxH = q_BxMxRxGxH.reshape(batch, num_kv_heads, rows * group, head_dim)
  scores = jnp.einsum("bmqh,bmkh->bmqk", q_BxMxQxH, k_BxMxKxH, preferred_element_type=jnp.float32)
  scores = (scores * head_dim**-0.5).reshape(batch, num_kv_heads, rows, group, keys)
  scores = jnp.where(mask_BxRxK[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
  exps = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  inv_sum_BxMxQx1 = (1.0 / jnp.sum(exps, axis=-1, keepdims=True)).reshape(batch, num_kv_heads, rows * group, 1)
  exps_BxMxQxK = exps.reshape(batch, num_kv_heads, rows * group, keys)
  out = jnp.einsum(
      "bmqk,bmkh->bmqh", exps_BxMxQxK.astype(v_BxMxKxH.dtype), v_BxMxKxH, preferred_element_type=jnp.float32
  )
  out_BxMxQxH = (out * inv_sum_BxMxQx1).astype(v_BxMxKxH.dtype)
  saved = (q_BxMxQxH, k_BxMxKxH, v_BxMxKxH, exps_BxMxQxK, inv_sum_BxMxQx1, out_BxMxQxH)
  return out_BxMxQxH.reshape(q_BxMxRxGxH.shape), saved


@jax.custom_vjp
def _block_attention(q_BxMxRxGxH, k_BxMxKxH, v_BxMxKxH, mask_BxRxK):
  """`_block_forward`'s output, with the softmax's backward written out (as flash attention
  does): each row's correction sum(dP * P) over its keys equals sum(dO * O) over the head
  dimension, so the backward passes over the [rows, keys] weights once, not three times,
  and reduces over 64 values a row instead of up to L (on the CPU demo's step, the
  backward's softmax reductions took a quarter of its time)."""
  return _block_forward(q_BxMxRxGxH, k_BxMxKxH, v_BxMxKxH, mask_BxRxK)[0]


def _block_attention_bwd(saved, d_out_BxMxRxGxH):
  """With P = exps * inv_sum: dV = P^T dO = exps^T (inv_sum dO), and
  dS = P (dP - c) = exps (inv_sum dP - inv_sum c), where dP = dO V^T and c = sum(dO * O)."""
  q_BxMxQxH, k_BxMxKxH, v_BxMxKxH, exps_BxMxQxK, inv_sum_BxMxQx1, out_BxMxQxH = saved
  head_dim = q_BxMxQxH.shape[-1]
  d_out = d_out_BxMxRxGxH.reshape(out_BxMxQxH.shape).astype(jnp.float32)
  d_out_weighted = (d_out * inv_sum_BxMxQx1).astype(v_BxMxKxH.dtype)  # dO scaled per row: P's normalisation
  # d_v and d_k contract over the query rows, the major dimension of both operands. XLA:CPU
  # runs such a batched dot at under half the rate of one contracting the lhs's minor
  # dimension, so they are computed transposed (d_v^T = d_out^T @ P) from the transposed
  # [Q, H] operand: a transpose of Q x H values, not of the Q x K weights.
  d_v_BxMxHxK = jnp.einsum("bmhq,bmqk->bmhk", d_out_weighted.swapaxes(2, 3), exps_BxMxQxK.astype(v_BxMxKxH.dtype))
  d_probs_weighted = jnp.einsum("bmqh,bmkh->bmqk", d_out_weighted, v_BxMxKxH, preferred_element_type=jnp.float32)
  correction = inv_sum_BxMxQx1 * jnp.sum(d_out * out_BxMxQxH.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (exps_BxMxQxK * (d_probs_weighted - correction) * head_dim**-0.5).astype(q_BxMxQxH.dtype)
  d_q = jnp.einsum("bmqk,bmkh->bmqh", d_scores, k_BxMxKxH).reshape(d_out_BxMxRxGxH.shape)
  d_k_BxMxHxK = jnp.einsum("bmhq,bmqk->bmhk", q_BxMxQxH.swapaxes(2, 3), d_scores)
  d_k, d_v = d_k_BxMxHxK.swapaxes(2, 3), d_v_BxMxHxK.swapaxes(2, 3)
  return d_q.astype(q_BxMxQxH.dtype), d_k.astype(k_BxMxKxH.dtype), d_v.astype(v_BxMxKxH.dtype), None


_block_attention.defvjp(_block_forward, _block_attention_bwd)


def _scanned_blocks(q_BxMxLxGxH, k_BxMxLxH, v_BxMxLxH, ids_BxL, window: int, block: int):
  """The blocks of `_xla_causal_attention` as a scan with a rematerialised body, for long
  rows: one block's [rows, L] scores are live at a time, forward and backward, where the
  unrolled blocks let XLA keep every block's probabilities of every layer (at length 4096
  most of the step's memory). Each block scores all L keys under the mask, so it spends
  twice the unrolled blocks' attention FLOPs."""
  batch, num_kv_heads, length, group, head_dim = q_BxMxLxGxH.shape
  num_blocks = length // block
  q_NxBxMxRxGxH = q_BxMxLxGxH.reshape(batch, num_kv_heads, num_blocks, block, group, head_dim).transpose(
      2, 0, 1, 3, 4, 5
  )
  slots = jnp.arange(length, dtype=jnp.int32)

  @jax.checkpoint
  def one_block(_, inputs):
    q_BxMxRxGxH, start = inputs
    q_slots_R = start + jnp.arange(block, dtype=jnp.int32)
    q_ids_BxR = jax.lax.dynamic_slice_in_dim(ids_BxL, start, block, axis=1)
    mask_BxRxK = attention_mask(q_ids_BxR, ids_BxL, jnp.broadcast_to(q_slots_R, (batch, block)), slots, window)[:, 0]
    return None, _block_attention(q_BxMxRxGxH, k_BxMxLxH, v_BxMxLxH, mask_BxRxK)

  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
  _, out_NxBxMxRxGxH = jax.lax.scan(one_block, None, (q_NxBxMxRxGxH, starts))
  return out_NxBxMxRxGxH.transpose(1, 2, 0, 3, 4, 5).reshape(batch, num_kv_heads, length, group, head_dim)


def _xla_causal_attention(q_BxLxNxH, k_BxLxMxH, v_BxLxMxH, segments: CausalSegments, block: int):
  """Causal self-attention in blocks of `block` query rows, each against the keys from the
  first its window can reach to its last row; the mask is built per block from segment ids.

  Layouts put (batch, kv head) first and the contracted dimension last, so every dot is a
  plain batched matmul and no [queries, keys]-sized tensor is transposed.
  """
  batch, length, num_heads, head_dim = q_BxLxNxH.shape
  num_kv_heads = k_BxLxMxH.shape[2]
  group = num_heads // num_kv_heads
  window = segments.window
  q_BxMxLxGxH = q_BxLxNxH.reshape(batch, length, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
  k_BxMxLxH, v_BxMxLxH = k_BxLxMxH.transpose(0, 2, 1, 3), v_BxLxMxH.transpose(0, 2, 1, 3)
  ids_BxL = segments.segment_ids_BxL
  slots = jnp.arange(length, dtype=jnp.int32)

  if block < length and length > CPU_SCAN_LENGTH and length % block == 0:
    out = _scanned_blocks(q_BxMxLxGxH, k_BxMxLxH, v_BxMxLxH, ids_BxL, window, block)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, num_heads, head_dim)
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    first = max(0, start - window + 1) if window else 0  # keys before `first` are outside every row's window
    outs.append(
        _block_attention(
            q_BxMxLxGxH[:, :, start:end],
            k_BxMxLxH[:, :, first:end],
            v_BxMxLxH[:, :, first:end],
            attention_mask(
                ids_BxL[:, start:end],
                ids_BxL[:, first:end],
                jnp.broadcast_to(slots[start:end], (batch, end - start)),
                slots[first:end],
                window,
            )[:, 0],
        )
    )
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, num_heads, head_dim)


def _splash_attention(q_BxLxNxH, k_BxLxMxH, v_BxLxMxH, segment_ids_BxL, window: int):
  """TPU splash attention (Pallas): the mask is built per tile from causality and segment
  ids, and tiles entirely masked out are skipped. Elsewhere the kernel runs in Pallas
  interpret mode, which is slow and meant for tests."""
  length, head_dim = q_BxLxNxH.shape[1], q_BxLxNxH.shape[3]
  group = q_BxLxNxH.shape[2] // k_BxLxMxH.shape[2]
  block = _splash_block(length)
  if not block:
    raise ValueError(
        f"model.attention_impl='splash' needs a sequence length that is a multiple of 128 "
        f"(and of {SPLASH_MAX_BLOCK} above it); got {length} (data.max_length)"
    )
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

  kernel = _splash_kernel(length, group, block, window, jax.default_backend() != "tpu")

  def local(q, k, v, segment_ids):
    batch, num_kv_heads = q.shape[0], k.shape[2]
    # [b, L, m*g, h] -> [b, m, g, L, h]: one MQA kernel call per key/value head.
    q = (q * head_dim**-0.5).reshape(batch, length, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_head(q_GxLxH, k_LxH, v_LxH, ids_L):
      return kernel(q_GxLxH, k_LxH, v_LxH, segment_ids=kernel_lib.SegmentIds(q=ids_L, kv=ids_L))

    per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_row)(q, k, v, segment_ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_kv_heads * group, head_dim)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BxLxNxH, k_BxLxMxH, v_BxLxMxH, segment_ids_BxL)
  # A Pallas kernel cannot be partitioned by XLA: run it per shard, sharded the way the
  # logical rules shard activations (dims that do not divide stay whole).
  batch_axes, _, head_axes, _ = sharding.fit_spec_to_shape(
      nn.logical_to_mesh_axes(("act_batch", "act_length", "act_kv_heads", None)), k_BxLxMxH.shape, mesh.shape
  )
  qkv, ids = P(batch_axes, None, head_axes, None), P(batch_axes, None)
  return jax.shard_map(local, in_specs=(qkv, qkv, qkv, ids), out_specs=qkv, check_vma=False)(
      q_BxLxNxH, k_BxLxMxH, v_BxLxMxH, segment_ids_BxL
  )


def _splash_kernel(length: int, num_heads: int, block: int, window: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  if window:  # keys from q - (window - 1) to q
    head_mask = mask_lib.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  else:
    head_mask = mask_lib.CausalMask((length, length))
  mask = mask_lib.MultiHeadMask([head_mask for _ in range(num_heads)])
  sizes = kernel_lib.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
  )
  # Built per trace, not cached: the kernel holds its mask tables as arrays, which would be
  # tracers of the first trace (jit, grad, scan) that built them.
  return kernel_lib.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def cached_attention(
    q_BxQxNxH: jax.Array,
    k_BxMxHxK: jax.Array,
    v_BxMxKxH: jax.Array,
    mask_Bx1xQxK: jax.Array,
    impl: AttentionImpl = "xla",
) -> jax.Array:
  """Attention of Q new positions over a KV cache in cftjax.model.init_cache's layouts
  (keys [B, M, H, K], values [B, M, K, H]) under a dense [B, 1, Q, K] mask. Both dots are
  plain batched matmuls over (batch, kv head) that read the cache where it lies; cuDNN
  gets the layout it takes."""
  if impl == "cudnn":
    k_BxKxMxH, v_BxKxMxH = k_BxMxHxK.transpose(0, 3, 1, 2), v_BxMxKxH.transpose(0, 2, 1, 3)
    return dot_product_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask_Bx1xQxK, impl)
  batch, q_len, num_heads, head_dim = q_BxQxNxH.shape
  num_kv_heads, keys = v_BxMxKxH.shape[1], v_BxMxKxH.shape[2]
  group = num_heads // num_kv_heads
  q_BxMxQxGxH = q_BxQxNxH.reshape(batch, q_len, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
  q_BxMxRxH = q_BxMxQxGxH.reshape(batch, num_kv_heads, q_len * group, head_dim)  # R = Q * G rows
  # Scores and softmax in float32 whatever the compute dtype: bf16 logits lose the mask.
  scores = jnp.einsum("bmrh,bmhk->bmrk", q_BxMxRxH, k_BxMxHxK, preferred_element_type=jnp.float32)
  scores = (scores * head_dim**-0.5).reshape(batch, num_kv_heads, q_len, group, keys)
  scores = jnp.where(mask_Bx1xQxK[:, :, :, None, :], scores, jnp.finfo(jnp.float32).min)
  probs_BxMxRxK = jax.nn.softmax(scores, axis=-1).reshape(batch, num_kv_heads, q_len * group, keys)
  out_BxMxRxH = jnp.einsum("bmrk,bmkh->bmrh", probs_BxMxRxK.astype(v_BxMxKxH.dtype), v_BxMxKxH)
  out_BxMxQxGxH = out_BxMxRxH.reshape(batch, num_kv_heads, q_len, group, head_dim)
  return out_BxMxQxGxH.transpose(0, 2, 1, 3, 4).reshape(batch, q_len, num_heads, head_dim)


def dot_product_attention(
    q_BxQxNxH: jax.Array,
    k_BxKxMxH: jax.Array,
    v_BxKxMxH: jax.Array,
    mask_Bx1xQxK: "jax.Array | CausalSegments",
    impl: AttentionImpl = "xla",
) -> jax.Array:
  """Attention with N query heads over M key/value heads (N % M == 0).

  The mask is dense [B, 1, Q, K], or `CausalSegments` for full causal self-attention.
  splash needs the latter; given a dense mask (cached decoding) it falls back to XLA.
  auto: splash on TPU where the length tiles, XLA otherwise.
  """
  if q_BxQxNxH.shape[2] % k_BxKxMxH.shape[2]:
    raise ValueError(f"num_heads={q_BxQxNxH.shape[2]} is not a multiple of " f"num_kv_heads={k_BxKxMxH.shape[2]}")
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"config key model.attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")
  if impl == "auto":
    tiles = isinstance(mask_Bx1xQxK, CausalSegments) and _splash_block(q_BxQxNxH.shape[1])
    impl = "splash" if tiles and jax.default_backend() == "tpu" else "xla"
  if isinstance(mask_Bx1xQxK, CausalSegments):
    if impl == "splash":
      return _splash_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask_Bx1xQxK.segment_ids_BxL, mask_Bx1xQxK.window)
    if impl == "xla":
      return _xla_causal_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask_Bx1xQxK, _causal_block(q_BxQxNxH.shape[1]))
    mask_Bx1xQxK = mask_Bx1xQxK.dense()
  if impl in ("xla", "splash"):
    return _xla_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask_Bx1xQxK)
  if impl == "cudnn":
    # cuDNN flash attention (GPU, bf16/fp16); handles GQA and an explicit mask.
    return jax.nn.dot_product_attention(q_BxQxNxH, k_BxKxMxH, v_BxKxMxH, mask=mask_Bx1xQxK, implementation="cudnn")
