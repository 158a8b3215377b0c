"""Which HF tensor each of our parameters comes from, and how its layout differs: one table
of layout kinds (LAYOUT_KINDS) drives shapes, export, and block reads on import."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from cftjax import sharding
from cftjax.hf.safetensors_io import TensorInfo, read_rows

_LAYER_TENSORS = {
    ("attn_norm", "scale"): ("model.layers.{i}.input_layernorm.weight", "same"),
    ("attn", "q_proj", "kernel"): ("model.layers.{i}.self_attn.q_proj.weight", "qkv"),
    ("attn", "k_proj", "kernel"): ("model.layers.{i}.self_attn.k_proj.weight", "qkv"),
    ("attn", "v_proj", "kernel"): ("model.layers.{i}.self_attn.v_proj.weight", "qkv"),
    ("attn", "q_proj", "bias"): ("model.layers.{i}.self_attn.q_proj.bias", "qkv_bias"),
    ("attn", "k_proj", "bias"): ("model.layers.{i}.self_attn.k_proj.bias", "qkv_bias"),
    ("attn", "v_proj", "bias"): ("model.layers.{i}.self_attn.v_proj.bias", "qkv_bias"),
    ("attn", "o_proj", "kernel"): ("model.layers.{i}.self_attn.o_proj.weight", "o"),
    ("mlp_norm", "scale"): ("model.layers.{i}.post_attention_layernorm.weight", "same"),
    ("mlp", "gate_proj", "kernel"): ("model.layers.{i}.mlp.gate_proj.weight", "transpose"),
    ("mlp", "up_proj", "kernel"): ("model.layers.{i}.mlp.up_proj.weight", "transpose"),
    ("mlp", "down_proj", "kernel"): ("model.layers.{i}.mlp.down_proj.weight", "transpose"),
}
_GLOBAL_TENSORS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "same"),
    ("final_norm", "scale"): ("model.norm.weight", "same"),
    ("lm_head", "kernel"): ("lm_head.weight", "transpose"),
}
# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where one leaf of our parameter tree comes from."""

  path: tuple[str, ...]
  hf_names: tuple[str, ...]  # one per layer in the leaf (several when layers are scanned)
  kind: str
  stacked: bool  # leading layer axis (nn.scan)


def param_sources(abstract_params: Any, num_layers: int) -> list[ParamSource]:
  """One ParamSource per leaf, in tree_leaves order."""
  sources = []
  for path, _ in jax.tree_util.tree_leaves_with_path(abstract_params):
    names = sharding.path_names(path)
    if names in _GLOBAL_TENSORS:
      template, kind = _GLOBAL_TENSORS[names]
      sources.append(ParamSource(names, (template,), kind, False))
    elif names[0] == "layers" and names[1:] in _LAYER_TENSORS:
      template, kind = _LAYER_TENSORS[names[1:]]
      hf_names = tuple(template.format(i=i) for i in range(num_layers))
      sources.append(ParamSource(names, hf_names, kind, True))
    elif names[0].startswith("layers_") and names[1:] in _LAYER_TENSORS:
      template, kind = _LAYER_TENSORS[names[1:]]
      sources.append(ParamSource(names, (template.format(i=int(names[0][7:])),), kind, False))
    else:
      raise ValueError(f"parameter {'/'.join(names)} has no Hugging Face counterpart")
  return sources


@dataclasses.dataclass(frozen=True)
class LayoutKind:
  """How one of our (unstacked) parameters maps onto its HF tensor, all four ways at once.

  hf_shape(shape)                  the HF tensor's shape for our parameter `shape`
  to_hf(x)                         our parameter -> the HF tensor (export)
  hf_ranges(ranges, shape)         (rows, cols or None) of the HF tensor that our block needs
  from_hf(x, ranges, shape)        that HF block -> our block `ranges` (import)
  """

  hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_ranges: Callable[[Sequence[tuple[int, int]], Sequence[int]], tuple]
  from_hf: Callable[[np.ndarray, Sequence[tuple[int, int]], Sequence[int]], np.ndarray]


def _qkv_from_hf(x, ranges, shape):
  (d0, d1), (n0, n1), (h0, h1) = ranges
  return transpose_2d(x).reshape(d1 - d0, n1 - n0, shape[2])[:, :, h0:h1]


def _qkv_bias_from_hf(x, ranges, shape):
  (n0, n1), (h0, h1) = ranges
  return x.reshape(n1 - n0, shape[1])[:, h0:h1]


def _o_from_hf(x, ranges, shape):
  (n0, n1), (h0, h1), (d0, d1) = ranges
  return transpose_2d(x).reshape(n1 - n0, shape[1], d1 - d0)[:, h0:h1, :]


# Shape letters as in model.py's legend (D width, N heads, H head dim, V vocab); A, B: a matrix's sides.
LAYOUT_KINDS = {
    # identical layout ([V,D] embedding, [D] norm scales)
    "same": LayoutKind(
        hf_shape=lambda shape: shape,
        to_hf=lambda x: x,
        hf_ranges=lambda ranges, shape: (ranges[0], ranges[1] if len(ranges) == 2 else None),
        from_hf=lambda x, ranges, shape: x,
    ),
    # ours [A,B] = hf[B,A].T (MLP kernels, lm_head)
    "transpose": LayoutKind(
        hf_shape=lambda shape: shape[::-1],
        to_hf=lambda x: transpose_2d(x),
        hf_ranges=lambda ranges, shape: (ranges[1], ranges[0]),
        from_hf=lambda x, ranges, shape: transpose_2d(x),
    ),
    # ours [D,N,H] = hf[N*H,D].T reshaped (q/k/v kernels)
    "qkv": LayoutKind(
        hf_shape=lambda shape: (shape[1] * shape[2], shape[0]),
        to_hf=lambda x: transpose_2d(x.reshape(x.shape[0], -1)),
        hf_ranges=lambda ranges, shape: ((ranges[1][0] * shape[2], ranges[1][1] * shape[2]), ranges[0]),
        from_hf=_qkv_from_hf,
    ),
    # ours [N,H] = hf[N*H] reshaped
    "qkv_bias": LayoutKind(
        hf_shape=lambda shape: (shape[0] * shape[1],),
        to_hf=lambda x: x.reshape(-1),
        hf_ranges=lambda ranges, shape: ((ranges[0][0] * shape[1], ranges[0][1] * shape[1]), None),
        from_hf=_qkv_bias_from_hf,
    ),
    # ours [N,H,D] = hf[D,N*H].T reshaped (output projection)
    "o": LayoutKind(
        hf_shape=lambda shape: (shape[2], shape[0] * shape[1]),
        to_hf=lambda x: transpose_2d(x.reshape(-1, x.shape[2])),
        hf_ranges=lambda ranges, shape: (ranges[2], (ranges[0][0] * shape[1], ranges[0][1] * shape[1])),
        from_hf=_o_from_hf,
    ),
}


def layout_kind(kind: str) -> LayoutKind:
  if kind not in LAYOUT_KINDS:
    raise ValueError(f"unknown layout kind {kind!r}")
  return LAYOUT_KINDS[kind]


def hf_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
  """Shape of the HF tensor for one (unstacked) parameter of ours."""
  return layout_kind(kind).hf_shape(tuple(shape))


def to_hf_layout(kind: str, x: np.ndarray) -> np.ndarray:
  """One of our (unstacked) parameters -> the HF tensor."""
  return layout_kind(kind).to_hf(x)


def hf_block_ranges(kind: str, ranges: Sequence[tuple[int, int]], shape: Sequence[int]):
  """(row range, column range or None) of the HF tensor that our block `ranges` needs."""
  return layout_kind(kind).hf_ranges(ranges, shape)


def from_hf_block(kind: str, x: np.ndarray, ranges: Sequence[tuple[int, int]], shape: Sequence[int]) -> np.ndarray:
  """HF-layout block (from `read_hf_block`) -> the block `ranges` of our (unstacked) parameter."""
  return layout_kind(kind).from_hf(x, ranges, shape)


def read_hf_block(info: TensorInfo, rows: tuple[int, int], cols: tuple[int, int] | None) -> np.ndarray:
  """The HF tensor's [rows, cols] block (a view when only some columns are needed)."""
  block = read_rows(info, *rows)
  return block if cols is None else block[:, cols[0] : cols[1]]


def transpose_2d(x: np.ndarray, tile: int = 256) -> np.ndarray:
  """Contiguous x.T, copied tile by tile: several times faster than numpy's plain strided
  copy for weight matrices, whose columns lie far apart in memory."""
  rows, cols = x.shape
  out = np.empty((cols, rows), x.dtype)
  for i in range(0, rows, tile):
    for j in range(0, cols, tile):
      out[j : j + tile, i : i + tile] = x[i : i + tile, j : j + tile].T
  return out


def read_block(kind: str, info: TensorInfo, ranges: Sequence[tuple[int, int]], shape: Sequence[int]) -> np.ndarray:
  """The block `ranges` (one (start, stop) per dim) of our parameter `shape`, reading only
  the rows of the HF tensor that it needs."""
  rows, cols = hf_block_ranges(kind, ranges, shape)
  return from_hf_block(kind, read_hf_block(info, rows, cols), ranges, shape)
