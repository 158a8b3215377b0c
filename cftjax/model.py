"""Decoder-only transformer covering the Llama 2/3, Mistral and Qwen2/2.5 families.

The model is a pure function of its parameter pytree (flax.linen). Parameter names follow
the Hugging Face layout closely so conversion is a rename plus a reshape. Every parameter
carries logical axis names; `sharding.py` maps them onto the device mesh.

Logical axes
  params:      vocab, embed, heads, kv_heads, head_dim, mlp, layers (scan axis)
  activations: act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab

Shape suffixes (the project's legend: `logits_BxLxV` is [batch, length, vocab])
  B batch rows        L sequence length       D model width (hidden_size)
  V vocabulary        N query heads           M key/value heads (GQA: N = M * G)
  G query heads per key/value head            H head dim
  Q query positions   K key positions         P prompt length (generate.py)
  1 a broadcast axis; in generate.py N counts new tokens (tokens_BxN), not heads.
A suffixed name whose value may be a structured stand-in says so in its type (e.g. a mask
`mask_Bx1xQxK` may be an attention.CausalSegments: the segments that define that mask).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cftjax import attention

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rope_scaling_type: str = ""
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"
  sliding_window: int = 0  # Mistral: attend to at most this many tokens (self included); 0 = all
  loss_chunk_size: int = 0  # training loss over chunks of this many positions (cftjax.head_loss); 0 = whole
  initializer_range: float = 0.02  # stddev of every random-init weight (HF's initializer_range)
  # Projection kernels held [out..., in...] (torch's Linear layout) instead of [in..., out...]:
  # the layout CPU decoding runs in (see `transpose_kernels`); not a config file key.
  transposed_kernels: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} must be a multiple of " f"model.num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r} is not one of " f"{sorted(REMAT_POLICIES)}")
    if self.attention_impl not in attention.ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl={self.attention_impl!r} is not one of " f"{attention.ATTENTION_IMPLS}")
    if self.sliding_window < 0:
      raise ValueError(f"model.sliding_window={self.sliding_window} must be >= 0 (0 = no window)")
    if self.initializer_range <= 0:
      raise ValueError(f"model.initializer_range={self.initializer_range} must be > 0")
    if self.rope_scaling_type not in ("", "llama3"):
      raise ValueError(f"model.rope_scaling_type={self.rope_scaling_type!r} is not '' or 'llama3'")

  @classmethod
  def from_config(cls, model_config: Any) -> "ModelConfig":
    """Builds from the `config.model` ConfigDict (keys the model does not use ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_config.items() if k in names}
    return cls(**values)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def num_params(self) -> int:
    """Parameter count (embedding included once when tied)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * v
    return v * d + self.num_layers * layer + d + head


def _init(config: ModelConfig):
  return nn.initializers.normal(stddev=config.initializer_range)


def constrain(x: Array, *names: str) -> Array:
  """Logical sharding constraint; a no-op outside a logical_axis_rules context."""
  return nn.with_logical_constraint(x, names)


# ------------------------------------------------------------------------------ RoPE
def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies (float32, as Hugging Face computes them), with Llama 3.1
  rescaling when configured."""
  exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
  if config.rope_scaling_type == "llama3":
    factor = config.rope_scaling_factor
    low_wavelen = config.rope_original_max_position / config.rope_low_freq_factor
    high_wavelen = config.rope_original_max_position / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (config.rope_original_max_position / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(is_medium, smoothed, inv_freq).astype(np.float32)
  return inv_freq


def rope_tables(positions_BxL: Array, inv_freq: np.ndarray, num_positions: int) -> tuple[Array, Array]:
  """(cos, sin) of every position's rotary angles, [B, L, 1, H] float32, for all layers.

  Gathered from tables of positions 0 .. num_positions - 1 built on the host, so they are
  constants of the program: computed in it, XLA fused cos and sin into every layer's rope,
  forward and backward, and recomputed them each time (~10% of the CPU demo step).
  num_positions is the row length for packed rows (each example's positions restart at 0)
  and the cache length when decoding; a position past it gives NaN, never a wrong angle.
  """
  angles = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # float32, as HF
  angles = np.concatenate([angles, angles], axis=-1)
  tables = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))
  return tuple(jnp.take(jnp.asarray(t), positions_BxL, axis=0, mode="fill")[:, :, None, :] for t in tables)


def apply_rope(x_BxLxNxH: Array, tables: tuple[Array, Array]) -> Array:
  """Rotary embedding in the "rotate half" layout Hugging Face checkpoints use."""
  cos_BxLx1xH, sin_BxLx1xH = tables
  x = x_BxLxNxH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos_BxLx1xH + rotated * sin_BxLx1xH).astype(x_BxLxNxH.dtype)


# ------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x.shape[-1],),
        self.config.jnp_param_dtype,
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
    return normed.astype(self.config.jnp_dtype) * scale.astype(self.config.jnp_dtype)


class Projection(nn.Module):
  """x @ kernel (+ bias) contracting the trailing `in_dims` dims of x into `features`.

  Parameters are created at their final shape with their logical names, so the sharded
  initialiser never sees a reshaped intermediate. The kernel is [in..., out...], or
  [out..., in...] with config.transposed_kernels.
  """

  config: ModelConfig
  features: tuple[int, ...]
  in_dims: int
  kernel_axes: tuple[str, ...]
  use_bias: bool = False
  bias_axes: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    in_shape, features = tuple(x.shape[-self.in_dims :]), tuple(self.features)
    shape, axes = in_shape + features, self.kernel_axes
    if cfg.transposed_kernels:
      shape, axes = features + in_shape, axes[self.in_dims :] + axes[: self.in_dims]
    kernel = self.param("kernel", nn.with_logical_partitioning(_init(cfg), axes), shape, cfg.jnp_param_dtype)
    x, kernel = x.astype(cfg.jnp_dtype), kernel.astype(cfg.jnp_dtype)
    batch_shape = x.shape[: x.ndim - self.in_dims]
    if jax.default_backend() == "cpu":
      # One [rows, in] x [in, out] matmul: XLA:CPU runs the backward of a dot with several
      # batch-like or contracted dims (dW contracts over batch and length) at about half the
      # speed of the same work as plain 2-D matmuls. The reshapes are free (row-major).
      fan_in = math.prod(in_shape)
      x = x.reshape(math.prod(batch_shape), fan_in)
      kernel = kernel.reshape((-1, fan_in) if cfg.transposed_kernels else (fan_in, -1))
      x_in, kernel_in = (1,), ((1,) if cfg.transposed_kernels else (0,))
    else:
      x_in = tuple(range(x.ndim - self.in_dims, x.ndim))
      kernel_in = tuple(range(len(features), kernel.ndim)) if cfg.transposed_kernels else tuple(range(self.in_dims))
    y = jax.lax.dot_general(x, kernel, ((x_in, kernel_in), ((), ()))).reshape(*batch_shape, *features)
    if self.use_bias:
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
          features,
          cfg.jnp_param_dtype,
      )
      y = y + bias.astype(cfg.jnp_dtype)
    return y


# Input dims each projection contracts (Projection.in_dims): o_proj takes [heads, head_dim].
_KERNEL_IN_DIMS = {"o_proj": 2}


def transpose_kernels(model: "Transformer", params: Any) -> tuple["Transformer", Any]:
  """The model with config.transposed_kernels, and `params` with every projection kernel
  moved to [out..., in...] (a scanned model's leading layers axis stays first).

  CPU decoding multiplies a few rows by every weight matrix, so its speed is the speed of
  streaming the weights from memory; XLA:CPU streams a kernel held [out, in] ~1.3-1.7x
  faster than one held [in, out] (a [16, 768] x [768, 2048] product from memory: 0.9 vs
  1.3 ms), as torch's Linear layout does.
  """
  if model.config.transposed_kernels:
    return model, params

  def transpose(path, x):
    names = [getattr(key, "key", None) for key in path]
    if names[-1] != "kernel":
      return x
    leading = 1 if model.config.scan_layers and names[0] == "layers" else 0
    in_dims = _KERNEL_IN_DIMS.get(names[-2], 1)
    in_axes = tuple(range(leading, leading + in_dims))
    return jnp.transpose(x, tuple(range(leading)) + tuple(range(leading + in_dims, x.ndim)) + in_axes)

  transposed = jax.tree_util.tree_map_with_path(transpose, params)
  return model.clone(config=dataclasses.replace(model.config, transposed_kernels=True)), transposed


def _dense(config: ModelConfig, features, kernel_axes, name, use_bias=False, bias_axes=()):
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  in_dims = _KERNEL_IN_DIMS.get(name, 1)
  return Projection(config, features, in_dims, tuple(kernel_axes), use_bias, tuple(bias_axes), name=name)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, rope_BxLx1xH, mask_Bx1xQxK, kv_cache=None, cache_index=None):
    cfg = self.config
    q = _dense(
        cfg,
        (cfg.num_heads, cfg.head_dim),
        ("embed", "heads", "head_dim"),
        "q_proj",
        cfg.qkv_bias,
        ("heads", "head_dim"),
    )(x_BxLxD)
    k = _dense(
        cfg,
        (cfg.num_kv_heads, cfg.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "k_proj",
        cfg.qkv_bias,
        ("kv_heads", "head_dim"),
    )(x_BxLxD)
    v = _dense(
        cfg,
        (cfg.num_kv_heads, cfg.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "v_proj",
        cfg.qkv_bias,
        ("kv_heads", "head_dim"),
    )(x_BxLxD)
    q = constrain(apply_rope(q, rope_BxLx1xH), "act_batch", "act_length", "act_heads", None)
    k = constrain(apply_rope(k, rope_BxLx1xH), "act_batch", "act_length", "act_kv_heads", None)
    v = constrain(v, "act_batch", "act_length", "act_kv_heads", None)
    if kv_cache is None:
      out, new_cache = attention.dot_product_attention(q, k, v, mask_Bx1xQxK, cfg.attention_impl), None
    else:
      # Write this chunk's keys/values at the shared slot offset, attend over the cache.
      def write(cache, new_BxQxMxH, layout):
        new = new_BxQxMxH.transpose(layout).astype(cache.dtype)
        return jax.lax.dynamic_update_slice_in_dim(cache, new, cache_index, axis=layout.index(1))

      new_cache = {"k": write(kv_cache["k"], k, (0, 2, 3, 1)), "v": write(kv_cache["v"], v, (0, 2, 1, 3))}
      out = attention.cached_attention(
          q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype), mask_Bx1xQxK, cfg.attention_impl
      )
    out = constrain(out, "act_batch", "act_length", "act_heads", None)
    out = _dense(cfg, cfg.hidden_size, ("heads", "head_dim", "embed"), "o_proj")(out)
    return out, new_cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x_BxLxD)
    up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x_BxLxD)
    hidden = constrain(nn.silu(gate) * up, "act_batch", "act_length", "act_mlp")
    return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)


class Block(nn.Module):
  """Pre-norm decoder layer. Signature fits nn.scan: (carry, per-layer input) -> (carry, out)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, layer_cache, rope_BxLx1xH, mask_Bx1xQxK, cache_index):
    attn_out, new_cache = Attention(self.config, name="attn")(
        RMSNorm(self.config, name="attn_norm")(x_BxLxD),
        rope_BxLx1xH,
        mask_Bx1xQxK,
        layer_cache,
        cache_index,
    )
    x = constrain(x_BxLxD + attn_out, "act_batch", "act_length", "act_embed")
    x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x))
    return constrain(x, "act_batch", "act_length", "act_embed"), new_cache


def params_init_fn(model: "Transformer", seed: int = 0, seq_len: int = 8):
  """A no-argument function returning boxed params, for eval_shape and sharded jit."""

  # Parameters do not depend on the attention kernel; XLA's takes any dummy length.
  init_model = model.clone(config=dataclasses.replace(model.config, attention_impl="xla"))

  def init():
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    return init_model.init(jax.random.key(seed), dummy, dummy, dummy + 1)["params"]

  return init


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> dict:
  """Empty KV cache: keys/values, slot segment ids, write index.

  Each layer's keys are [B, M, H, K] and values [B, M, K, H]: the layouts their decoding
  dots (q @ k, probs @ v) read as they lie, where a [B, K, M, H] cache was transposed in
  every layer at every token. Stacked over a leading layers axis for scanned layers; a
  tuple of per-layer buffers for unrolled ones, so each layer writes its own buffer in
  place (restacking copied the whole cache at every token).
  """
  dtype = dtype or config.jnp_dtype
  m, h = config.num_kv_heads, config.head_dim

  def empty(*shape):
    if config.scan_layers:
      return jnp.zeros((config.num_layers, *shape), dtype)
    return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

  return {
      "k": empty(batch_size, m, h, max_length),
      "v": empty(batch_size, m, max_length, h),
      "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


class Transformer(nn.Module):
  """tokens -> logits. Without a cache it scores whole (packed) rows; with one it decodes."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_param_dtype,
        embedding_init=nn.with_logical_partitioning(_init(cfg), ("vocab", "embed")),
        name="embed",
    )
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          out_axes=0,
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")
    else:
      self.layer_list = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg, name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")

  def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache=None, return_hidden=False):
    """Returns (float32 logits [B, L, V], updated cache or None).

    return_hidden: return the final-norm hidden states [B, L, D] instead of logits, for a
    loss that applies the head itself (cftjax.head_loss, chunk by chunk).

    positions restart at 0 for each packed example (RoPE); segment_ids are 1-based per
    example with 0 for padding. With a cache, the chunk is written at cache["index"].
    """
    cfg = self.config
    length = tokens_BxL.shape[1]
    if cache is None:
      mask = attention.self_attention_mask(segment_ids_BxL, cfg.attention_impl, cfg.sliding_window)
      layer_caches, cache_index = None, None
    else:
      cache_index = cache["index"]
      kv_segment_ids = jax.lax.dynamic_update_slice_in_dim(
          cache["segment_ids"], segment_ids_BxL.astype(jnp.int32), cache_index, axis=1
      )
      q_slots = cache_index + jnp.arange(length, dtype=jnp.int32)
      kv_slots = jnp.arange(kv_segment_ids.shape[1], dtype=jnp.int32)
      # A sequence's cache slots are contiguous (left padding), so slot distance is token distance.
      mask = attention.attention_mask(
          segment_ids_BxL,
          kv_segment_ids,
          jnp.broadcast_to(q_slots, tokens_BxL.shape),
          kv_slots,
          cfg.sliding_window,
      )
      layer_caches = {"k": cache["k"], "v": cache["v"]}

    x = constrain(self.embed(tokens_BxL), "act_batch", "act_length", "act_embed")
    num_positions = length if cache is None else cache["segment_ids"].shape[1]
    rope = rope_tables(positions_BxL, rope_inverse_frequencies(cfg), num_positions)
    if cfg.scan_layers:
      x, new_layer_caches = self.layers(x, layer_caches, rope, mask, cache_index)
    else:
      outs = []
      for i, layer in enumerate(self.layer_list):
        layer_cache = None if layer_caches is None else {"k": layer_caches["k"][i], "v": layer_caches["v"][i]}
        x, out = layer(x, layer_cache, rope, mask, cache_index)
        outs.append(out)
      if layer_caches is not None:
        new_layer_caches = {name: tuple(out[name] for out in outs) for name in ("k", "v")}

    x = self.final_norm(x)
    if return_hidden:
      logits = x
    elif cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    if not return_hidden:
      logits = constrain(logits.astype(jnp.float32), "act_batch", "act_length", "act_vocab")

    new_cache = None
    if cache is not None:
      new_cache = {
          "k": new_layer_caches["k"],
          "v": new_layer_caches["v"],
          "segment_ids": kv_segment_ids,
          "index": cache_index + length,
      }
    return logits, new_cache
