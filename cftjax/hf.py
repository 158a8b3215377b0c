"""Hugging Face checkpoints in and out: config mapping, safetensors import and export.

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

Import places every parameter straight onto its target sharding: for each device shard
the matching rows of the needed layer tensors are read from the safetensors file(s) with
positioned reads, converted to our layout and sent to that device, so the host holds one
shard (plus one layer block) at a time and never the whole model. Export gathers one
layer tensor at a time and streams it into sharded safetensors files.

Files are read and written with a small built-in safetensors codec (8-byte header size,
JSON header, raw little-endian data): it handles bfloat16 through ml_dtypes (numpy has
no bf16), reads only the byte ranges a shard needs and writes a file without holding it
in memory. Anything unexpected (missing file, unknown tensor, wrong shape, unsupported
config option) raises an error naming the file and the tensor or field.

Mistral's sliding window is imported as `model.sliding_window`. Qwen2's
`use_sliding_window` (a window on only some layers) is not implemented: full causal
attention agrees with it for sequences no longer than the window, so import warns, and
`hf_model_config(..., max_length=N)` refuses N above the window.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import ml_dtypes
import numpy as np

from cftjax import checkpoint, sharding
from cftjax.data.records import read_json_object
from cftjax.model import ModelConfig, Transformer, params_init_fn

log = logging.getLogger(__name__)

# architecture -> family (config.model.family); family -> (architecture, model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
FAMILY_TO_HF = {family: (arch, family) for arch, family in ARCHITECTURES.items()}

# Copied next to an imported checkpoint (DIR/tokenizer/) and into an export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_SUBDIR = "tokenizer"  # inside an imported checkpoint directory
SOURCE_CONFIG_NAME = "hf_config.json"  # the imported config.json, kept for export
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# safetensors dtype names <-> numpy dtypes (bf16 and fp8 come from ml_dtypes).
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOAT_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_LOADABLE_DTYPES = {_DTYPES[n] for n in ("F64", "F32", "F16", "BF16")}


# ============================================================================== config.json
def read_hf_config(hf_dir: str | os.PathLike) -> dict:
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: expected a Hugging Face model directory with config.json and "
        f"{SINGLE_FILE} (or {INDEX_FILE})"
    )
  return read_json_object(path)


def hf_family(hf_config: dict, where: str = "config.json") -> str:
  architectures = hf_config.get("architectures") or []
  known = [a for a in architectures if a in ARCHITECTURES]
  if known:
    return ARCHITECTURES[known[0]]
  if not architectures and hf_config.get("model_type") in FAMILY_TO_HF:
    return hf_config["model_type"]
  raise ValueError(
      f"{where}: unsupported architecture {architectures or hf_config.get('model_type')!r}; "
      f"supported: {sorted(ARCHITECTURES)}"
  )


def _rope_fields(hf_config: dict, where: str) -> dict:
  """rope_theta and Llama 3.1 scaling, from transformers 4 keys (rope_theta, rope_scaling)
  or transformers 5 keys (rope_parameters)."""
  params = hf_config.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    theta, scaling = params["rope_theta"], params
  else:
    theta, scaling = hf_config.get("rope_theta", 10000.0), hf_config.get("rope_scaling")
  fields: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling_type": ""}
  if not scaling:
    return fields
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return fields
  if rope_type != "llama3":
    raise ValueError(
        f"{where}: rope scaling type {rope_type!r} is not supported (only 'llama3', as in "
        f"Llama 3.1, or none)"
    )
  try:
    fields.update(
        rope_scaling_type="llama3",
        rope_scaling_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_position=int(scaling["original_max_position_embeddings"]),
    )
  except KeyError as e:
    raise ValueError(f"{where}: llama3 rope scaling lacks field {e.args[0]!r}") from e
  return fields


def _unsupported_sliding_window(hf_config: dict, family: str) -> int | None:
  window = hf_config.get("sliding_window")
  if family == "qwen2" and hf_config.get("use_sliding_window"):
    return int(window) if window else None
  return None


def hf_model_config(hf_dir: str | os.PathLike, max_length: int | None = None, warn: bool = True) -> dict:
  """config.json -> overrides for `config.model` (keys are `config.model` field names).

  `max_length` (the training/eval sequence length) is checked against Qwen2's sliding
  window: above it our full attention would differ from the model's, so that is an error.
  """
  hf_config = read_hf_config(hf_dir)
  where = str(Path(hf_dir) / "config.json")
  family = hf_family(hf_config, where)

  def field(key: str, default: Any = None) -> Any:
    value = hf_config.get(key)
    if value is None:
      if default is None:
        raise ValueError(f"{where}: missing field {key!r}")
      return default
    return value

  if field("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={hf_config['hidden_act']!r} is not supported (only 'silu')")
  for flag in ("attention_bias", "mlp_bias"):
    if hf_config.get(flag):
      raise ValueError(f"{where}: {flag}=true is not supported (only Qwen2's q/k/v biases are)")
  hidden_size = int(field("hidden_size"))
  num_heads = int(field("num_attention_heads"))
  head_dim = hf_config.get("head_dim")
  if head_dim is None:
    if hidden_size % num_heads:
      raise ValueError(f"{where}: hidden_size={hidden_size} is not a multiple of num_attention_heads={num_heads}")
    head_dim = hidden_size // num_heads

  window = _unsupported_sliding_window(hf_config, family)
  if window is not None:
    if max_length is not None and max_length > window:
      raise ValueError(
          f"{where}: sliding_window={window} is not supported and max length {max_length} "
          f"exceeds it (cftjax attends to all earlier tokens); use a max length <= {window}"
      )
    if warn:
      log.warning(
          "%s: sliding_window=%d is not implemented (cftjax attends to all earlier tokens); "
          "results match the original model only for sequences up to %d tokens",
          where, window, window,
      )

  overrides = {
      "family": family,
      "vocab_size": int(field("vocab_size")),
      "hidden_size": hidden_size,
      "num_layers": int(field("num_hidden_layers")),
      "num_heads": num_heads,
      "num_kv_heads": int(field("num_key_value_heads", num_heads)),
      "head_dim": int(head_dim),
      "intermediate_size": int(field("intermediate_size")),
      "rms_norm_eps": float(field("rms_norm_eps", 1e-6)),
      # All three families default to untied embeddings in transformers.
      "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
      "qkv_bias": family == "qwen2",
      "sliding_window": int(hf_config.get("sliding_window") or 0) if family == "mistral" else 0,
  }
  overrides.update(_rope_fields(hf_config, where))
  return overrides


def check_model_config(model_config: ModelConfig, overrides: dict, where: str) -> None:
  """Every architecture field of `model_config` must equal what config.json says."""
  mismatches = [
      f"model.{key}={getattr(model_config, key)!r} but {where} says {value!r}"
      for key, value in overrides.items()
      if hasattr(model_config, key) and getattr(model_config, key) != value
  ]
  if mismatches:
    raise ValueError("model config does not match the checkpoint: " + "; ".join(mismatches))


# ============================================================================== safetensors
@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  path: Path
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in the file

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
  """Tensor name -> TensorInfo for one safetensors file (reads the header only)."""
  if not path.is_file():
    raise FileNotFoundError(f"safetensors file {path} not found")
  file_size = path.stat().st_size
  with open(path, "rb") as f:
    size_bytes = f.read(8)
    if len(size_bytes) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    header_size = int.from_bytes(size_bytes, "little")
    if header_size > min(file_size - 8, 100 * 2**20):
      raise ValueError(f"{path}: not a safetensors file (header size {header_size} is implausible)")
    try:
      header = json.loads(f.read(header_size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
  data_start = 8 + header_size
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry.get("dtype") not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    begin, end = entry["data_offsets"]
    info = TensorInfo(name, path, _DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin)
    if end - begin != info.nbytes or data_start + end > file_size:
      raise ValueError(f"{path}: tensor {name!r} data range {begin}..{end} does not fit its shape or the file")
    tensors[name] = info
  return tensors


def index_hf_tensors(hf_dir: str | os.PathLike) -> dict[str, TensorInfo]:
  """All tensors of a model directory: model.safetensors or the shards named by the index."""
  hf_dir = Path(hf_dir)
  index_path = hf_dir / INDEX_FILE
  if index_path.is_file():
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path}: missing or empty 'weight_map'")
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors = {}
    for name, file_name in weight_map.items():
      if file_name not in headers:
        shard_path = hf_dir / file_name
        if not shard_path.is_file():
          raise FileNotFoundError(f"{shard_path} not found (named for tensor {name!r} in {index_path})")
        headers[file_name] = read_safetensors_header(shard_path)
      if name not in headers[file_name]:
        raise ValueError(f"{hf_dir / file_name}: tensor {name!r} listed in {index_path} is not in the file")
      tensors[name] = headers[file_name][name]
    return tensors
  single = hf_dir / SINGLE_FILE
  if single.is_file():
    return read_safetensors_header(single)
  others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pth"))
  hint = f" (found {', '.join(others)}: convert to safetensors first)" if others else ""
  raise FileNotFoundError(f"neither {single} nor {index_path} found{hint}")


def _read_exact(f, out: np.ndarray) -> None:
  view = memoryview(out.reshape(-1).view(np.uint8))
  done = 0
  while done < len(view):  # one read() returns at most ~2 GiB
    n = f.readinto(view[done:])
    if not n:
      raise ValueError(f"{f.name}: file ends early")
    done += n


def read_rows(info: TensorInfo, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of the tensor's first dimension: one contiguous read."""
  row_shape = info.shape[1:]
  row_bytes = math.prod(row_shape) * info.dtype.itemsize
  out = np.empty((stop - start, *row_shape), info.dtype)
  with open(info.path, "rb", buffering=0) as f:
    f.seek(info.offset + start * row_bytes)
    _read_exact(f, out)
  return out


def write_safetensors(
    path: Path, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
) -> None:
  """Writes a safetensors file whose tensors `produce(name)` yields one at a time."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in tensors:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(len(header_bytes).to_bytes(8, "little"))
    f.write(header_bytes)
    for name, shape, dtype in tensors:
      array = np.ascontiguousarray(produce(name), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} came out with shape {array.shape}, expected {shape}")
      f.write(memoryview(array.reshape(-1).view(np.uint8)))
  os.replace(tmp, path)


# ============================================================================== layout mapping
# How one of our parameters relates to its Hugging Face tensor (per layer):
#   same       identical layout ([V,D] embedding, [D] norm scales)
#   transpose  ours [A,B] = hf[B,A].T                 (MLP kernels, lm_head)
#   qkv        ours [D,N,Dh] = hf[N*Dh,D].T reshaped  (q/k/v kernels)
#   qkv_bias   ours [N,Dh] = hf[N*Dh] reshaped
#   o          ours [N,Dh,D] = hf[D,N*Dh].T reshaped  (output projection)
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
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


def hf_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
  """Shape of the HF tensor for one (unstacked) parameter of ours."""
  shape = tuple(shape)
  if kind == "same":
    return shape
  if kind == "transpose":
    return shape[::-1]
  if kind == "qkv":
    return (shape[1] * shape[2], shape[0])
  if kind == "qkv_bias":
    return (shape[0] * shape[1],)
  if kind == "o":
    return (shape[2], shape[0] * shape[1])
  raise ValueError(f"unknown layout kind {kind!r}")


def to_hf_layout(kind: str, x: np.ndarray) -> np.ndarray:
  """One of our (unstacked) parameters -> the HF tensor."""
  if kind == "same":
    return x
  if kind == "transpose":
    return transpose_2d(x)
  if kind == "qkv":
    return transpose_2d(x.reshape(x.shape[0], -1))
  if kind == "qkv_bias":
    return x.reshape(-1)
  if kind == "o":
    return transpose_2d(x.reshape(-1, x.shape[2]))
  raise ValueError(f"unknown layout kind {kind!r}")


def hf_block_ranges(kind: str, ranges: Sequence[tuple[int, int]], shape: Sequence[int]):
  """(row range, column range or None) of the HF tensor that our block `ranges` needs."""
  if kind == "same":
    return ranges[0], (ranges[1] if len(ranges) == 2 else None)
  if kind == "transpose":
    return ranges[1], ranges[0]
  if kind == "qkv":
    (d0, d1), (n0, n1), _ = ranges
    return (n0 * shape[2], n1 * shape[2]), (d0, d1)
  if kind == "qkv_bias":
    (n0, n1), _ = ranges
    return (n0 * shape[1], n1 * shape[1]), None
  if kind == "o":
    (n0, n1), _, (d0, d1) = ranges
    return (d0, d1), (n0 * shape[1], n1 * shape[1])
  raise ValueError(f"unknown layout kind {kind!r}")


def read_hf_block(info: TensorInfo, rows: tuple[int, int], cols: tuple[int, int] | None) -> np.ndarray:
  """The HF tensor's [rows, cols] block (a view when only some columns are needed)."""
  block = read_rows(info, *rows)
  return block if cols is None else block[:, cols[0]:cols[1]]


def transpose_2d(x: np.ndarray, tile: int = 256) -> np.ndarray:
  """Contiguous x.T, copied tile by tile: several times faster than numpy's plain strided
  copy for weight matrices, whose columns lie far apart in memory."""
  rows, cols = x.shape
  out = np.empty((cols, rows), x.dtype)
  for i in range(0, rows, tile):
    for j in range(0, cols, tile):
      out[j:j + tile, i:i + tile] = x[i:i + tile, j:j + tile].T
  return out


def from_hf_block(kind: str, x: np.ndarray, ranges: Sequence[tuple[int, int]], shape: Sequence[int]) -> np.ndarray:
  """HF-layout block (from `read_hf_block`) -> the block `ranges` of our (unstacked) parameter."""
  if kind == "same":
    return x
  if kind == "transpose":
    return transpose_2d(x)
  if kind == "qkv":
    (d0, d1), (n0, n1), (h0, h1) = ranges
    return transpose_2d(x).reshape(d1 - d0, n1 - n0, shape[2])[:, :, h0:h1]
  if kind == "qkv_bias":
    (n0, n1), (h0, h1) = ranges
    return x.reshape(n1 - n0, shape[1])[:, h0:h1]
  if kind == "o":
    (n0, n1), (h0, h1), (d0, d1) = ranges
    return transpose_2d(x).reshape(n1 - n0, shape[1], d1 - d0)[:, h0:h1, :]
  raise ValueError(f"unknown layout kind {kind!r}")


def read_block(kind: str, info: TensorInfo, ranges: Sequence[tuple[int, int]], shape: Sequence[int]) -> np.ndarray:
  """The block `ranges` (one (start, stop) per dim) of our parameter `shape`, reading only
  the rows of the HF tensor that it needs."""
  rows, cols = hf_block_ranges(kind, ranges, shape)
  return from_hf_block(kind, read_hf_block(info, rows, cols), ranges, shape)


# ============================================================================== import
def model_abstract_params(model_config: ModelConfig, mesh) -> tuple[Any, Any]:
  """(ShapeDtypeStruct tree, NamedSharding tree) of the model's parameters on `mesh`."""
  return sharding.abstract_params_and_shardings(params_init_fn(Transformer(model_config)), mesh)


def _match_tensors(sources: list[ParamSource], abstract_leaves: list, tensors: dict[str, TensorInfo],
                   hf_dir: Path, tie_embeddings: bool) -> None:
  """Every tensor we need exists with the right shape; every other tensor is accounted for."""
  used = set()
  for source, leaf in zip(sources, abstract_leaves):
    expected = hf_shape(source.kind, leaf.shape[1:] if source.stacked else leaf.shape)
    for name in source.hf_names:
      if name not in tensors:
        raise ValueError(f"{hf_dir}: tensor {name!r} (for parameter {'/'.join(source.path)}) is missing")
      info = tensors[name]
      if info.shape != expected:
        raise ValueError(
            f"{info.path}: tensor {name!r} has shape {list(info.shape)}, expected {list(expected)} "
            f"from {hf_dir / 'config.json'}"
        )
      if info.dtype not in _LOADABLE_DTYPES:
        raise ValueError(f"{info.path}: tensor {name!r} has dtype {info.dtype}; only float64/32/16 and "
                         f"bfloat16 weights load (quantized checkpoints are not supported)")
      used.add(name)
  ignorable = {n for n in tensors if n.endswith(_IGNORED_SUFFIXES)}
  if tie_embeddings and "lm_head.weight" in tensors:
    ignorable.add("lm_head.weight")  # a stored copy of the tied embedding, as transformers treats it
  unexpected = sorted(set(tensors) - used - ignorable)
  if unexpected:
    raise ValueError(
        f"{hf_dir}: {len(unexpected)} tensor(s) the model has no place for, e.g. {unexpected[:5]} "
        f"(in {tensors[unexpected[0]].path.name})"
    )


def _unit_ranges(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  ranges = []
  for s, dim in zip(index, shape):
    start, stop, step = s.indices(dim)
    if step != 1:
      raise ValueError(f"strided shard index {index} is not supported")
    ranges.append((start, stop))
  return tuple(ranges)


def _import_leaf(source: ParamSource, leaf: jax.ShapeDtypeStruct, target_sharding,
                 tensors: dict[str, TensorInfo], dtype: np.dtype) -> jax.Array:
  """One parameter onto its sharding: each distinct shard read, converted and sent once
  (host memory: that shard plus one layer's block)."""
  shape = tuple(leaf.shape)
  device_to_index = target_sharding.addressable_devices_indices_map(shape)
  by_ranges: dict[tuple, list] = {}
  for device, index in device_to_index.items():
    by_ranges.setdefault(_unit_ranges(index, shape), []).append(device)
  device_arrays = {}
  for ranges, devices in by_ranges.items():
    if source.stacked:
      (l0, l1), inner = ranges[0], ranges[1:]
      host = np.empty([b - a for a, b in ranges], dtype)
      for j, layer in enumerate(range(l0, l1)):
        host[j] = read_block(source.kind, tensors[source.hf_names[layer]], inner, shape[1:])
    else:
      host = np.asarray(read_block(source.kind, tensors[source.hf_names[0]], ranges, shape), dtype)
    for device in devices:
      device_arrays[device] = jax.device_put(host, device)
    del host
  arrays = [device_arrays[d] for d in device_to_index]
  return jax.make_array_from_single_device_arrays(shape, target_sharding, arrays)


def import_params(hf_dir: str | os.PathLike, model_config: ModelConfig | Any, mesh) -> Any:
  """HF safetensors -> our (unboxed) parameter tree, each leaf on its mesh sharding.

  `model_config` (ModelConfig or the `config.model` ConfigDict) must agree with config.json
  (see `hf_model_config`); its param_dtype and scan_layers choose the result's layout.
  """
  hf_dir = Path(hf_dir)
  if not isinstance(model_config, ModelConfig):
    model_config = ModelConfig.from_config(model_config)
  check_model_config(model_config, hf_model_config(hf_dir, warn=False), str(hf_dir / "config.json"))
  tensors = index_hf_tensors(hf_dir)
  abstract, shardings = model_abstract_params(model_config, mesh)
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  sharding_leaves = jax.tree_util.tree_leaves(shardings)
  sources = param_sources(abstract, model_config.num_layers)
  _match_tensors(sources, leaves, tensors, hf_dir, model_config.tie_embeddings)
  dtype = np.dtype(model_config.jnp_param_dtype)
  params = []
  for n, (source, leaf, leaf_sharding) in enumerate(zip(sources, leaves, sharding_leaves), 1):
    params.append(_import_leaf(source, leaf, leaf_sharding, tensors, dtype))
    log.info("imported %d/%d %s %s", n, len(sources), "/".join(source.path), tuple(leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, params)


def default_chat_template(family: str, tokenizer_dir: Path) -> str:
  """The chat template an imported model most likely uses (data.chat_template)."""
  if family == "qwen2":
    return "qwen"
  tokenizer_json = tokenizer_dir / "tokenizer.json"
  if not (tokenizer_json.is_file() and "<|start_header_id|>" in tokenizer_json.read_text(encoding="utf-8")):
    return "plain"
  # The chat template sits in tokenizer_config.json (older exports) or chat_template.jinja.
  templates = [tokenizer_dir / "tokenizer_config.json", tokenizer_dir / "chat_template.jinja"]
  if any(path.is_file() and "Cutting Knowledge Date" in path.read_text(encoding="utf-8") for path in templates):
    return "llama3_1"
  return "llama3"


def require_empty_dir(out_dir: Path) -> None:
  """Conversions never mix their output with older files (stale shards, other steps)."""
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f"output directory {out_dir} exists and is not empty; remove it or pick another")


def copy_tokenizer_files(source_dir: Path, out_dir: Path) -> list[str]:
  """Copies the tokenizer/generation files that exist; returns their names."""
  out_dir.mkdir(parents=True, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if (source_dir / name).is_file():
      shutil.copyfile(source_dir / name, out_dir / name)
      copied.append(name)
  return copied


def import_to_checkpoint(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, mesh, config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """HF model directory -> cftjax parameter checkpoint (Orbax, step 0) in `out_dir`.

  `config` supplies everything config.json does not decide (param_dtype, scan_layers, ...).
  Written: the Orbax steps, `tokenizer/` (tokenizer and generation files) and
  `hf_config.json` (the source config.json, reused by export). Returns the saved config,
  whose data.tokenizer points at `out_dir/tokenizer` and data.chat_template at the
  family's template.
  """
  hf_dir, out_dir = Path(hf_dir), Path(out_dir)
  require_empty_dir(out_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(hf_model_config(hf_dir, max_length=config.data.get("max_length")))
  model_config = ModelConfig.from_config(config.model)
  tokenizer_dir = out_dir / TOKENIZER_SUBDIR
  config.data.tokenizer = str(tokenizer_dir.absolute())
  config.data.chat_template = default_chat_template(model_config_family(config), hf_dir)
  params = import_params(hf_dir, model_config, mesh)
  checkpoint.save_params(out_dir, params, config)
  if jax.process_index() == 0:
    copied = copy_tokenizer_files(hf_dir, tokenizer_dir)
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model")):
      log.warning("%s holds no tokenizer.json or tokenizer.model: set data.tokenizer yourself", hf_dir)
    shutil.copyfile(hf_dir / "config.json", out_dir / SOURCE_CONFIG_NAME)
  return config


def model_config_family(config: ml_collections.ConfigDict) -> str:
  family = config.model.get("family", "llama")
  if family not in FAMILY_TO_HF:
    raise ValueError(f"config key model.family={family!r} is not one of {sorted(FAMILY_TO_HF)}")
  return family


# ============================================================================== export
def hf_config_dict(model_config: ModelConfig, family: str, torch_dtype: str,
                   base: dict | None = None) -> dict:
  """config.json for transformers; fields we do not model (token ids, max positions,
  Qwen2 sliding-window fields) come from `base`, the original model's config.json, when given."""
  architecture, model_type = FAMILY_TO_HF[family]
  out = dict(base or {}) if (base or {}).get("model_type") == model_type else {}
  for stale in ("rope_parameters", "rope_scaling", "dtype", "transformers_version", "_name_or_path"):
    out.pop(stale, None)
  rope_scaling = None
  if model_config.rope_scaling_type == "llama3":
    rope_scaling = {
        "rope_type": "llama3",
        "factor": model_config.rope_scaling_factor,
        "low_freq_factor": model_config.rope_low_freq_factor,
        "high_freq_factor": model_config.rope_high_freq_factor,
        "original_max_position_embeddings": model_config.rope_original_max_position,
    }
  out.setdefault("max_position_embeddings", 4096 if rope_scaling is None
                 else int(model_config.rope_original_max_position * model_config.rope_scaling_factor))
  out.setdefault("initializer_range", 0.02)
  out.setdefault("attention_dropout", 0.0)
  out.setdefault("use_cache", True)
  out.update(
      architectures=[architecture],
      model_type=model_type,
      vocab_size=model_config.vocab_size,
      hidden_size=model_config.hidden_size,
      intermediate_size=model_config.intermediate_size,
      num_hidden_layers=model_config.num_layers,
      num_attention_heads=model_config.num_heads,
      num_key_value_heads=model_config.num_kv_heads,
      head_dim=model_config.head_dim,
      hidden_act="silu",
      rms_norm_eps=model_config.rms_norm_eps,
      rope_theta=model_config.rope_theta,
      rope_scaling=rope_scaling,
      tie_word_embeddings=model_config.tie_embeddings,
      torch_dtype=torch_dtype,
  )
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if family == "mistral":
    out["sliding_window"] = model_config.sliding_window or None
  if family == "qwen2":
    out.setdefault("use_sliding_window", False)
    out.setdefault("sliding_window", None)
    out.setdefault("max_window_layers", model_config.num_layers)
    if "layer_types" in out and len(out["layer_types"]) != model_config.num_layers:
      out.pop("layer_types")
  return out


@dataclasses.dataclass(frozen=True)
class _HFTensor:
  name: str
  shape: tuple[int, ...]
  leaf: int  # index into the parameter leaves
  layer: int | None  # index along the stacked layer axis
  kind: str


def _hf_tensors(sources: list[ParamSource], leaves: list) -> list[_HFTensor]:
  """HF tensors in the order transformers writes them (embedding, layer by layer, head)."""
  entries = []
  for n, (source, leaf) in enumerate(zip(sources, leaves)):
    shape = hf_shape(source.kind, leaf.shape[1:] if source.stacked else leaf.shape)
    for layer, name in enumerate(source.hf_names):
      entries.append(_HFTensor(name, shape, n, layer if source.stacked else None, source.kind))

  def order(e: _HFTensor):
    if e.name.startswith("model.embed_tokens"):
      return (0, 0, e.name)
    if e.name.startswith("model.layers."):
      return (1, int(e.name.split(".")[2]), e.name)
    return (2, 0, e.name)

  return sorted(entries, key=order)


def _plan_shards(entries: list[_HFTensor], itemsize: int, max_shard_bytes: int) -> list[list[_HFTensor]]:
  shards: list[list[_HFTensor]] = [[]]
  size = 0
  for e in entries:
    nbytes = math.prod(e.shape) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  return shards


def save_hf_weights(params: Any, model_config: ModelConfig, out_dir: str | os.PathLike, dtype: str = "bfloat16",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes `params` as HF safetensors (sharded above `max_shard_bytes`, with the index).

  One layer tensor at a time is gathered to the host. Every process must call this (the
  gathers are collective on multi-host meshes); process 0 writes. Returns the file names.
  """
  out_dir = Path(out_dir)
  if dtype not in _FLOAT_DTYPE_NAMES:
    raise ValueError(f"export dtype {dtype!r} is not one of {sorted(_FLOAT_DTYPE_NAMES)}")
  np_dtype = _DTYPES[_FLOAT_DTYPE_NAMES[dtype]]
  leaves = jax.tree_util.tree_leaves(params)
  sources = param_sources(params, model_config.num_layers)
  entries = _hf_tensors(sources, leaves)
  shards = _plan_shards(entries, np_dtype.itemsize, max_shard_bytes)
  names = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
  writer = jax.process_index() == 0
  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)
  for file_name, shard in zip(names, shards):
    by_name = {e.name: e for e in shard}

    def produce(name: str) -> np.ndarray:
      e = by_name[name]
      x = leaves[e.leaf] if e.layer is None else leaves[e.leaf][e.layer]
      return to_hf_layout(e.kind, sharding.to_host(x).astype(np_dtype, copy=False))

    if writer:
      write_safetensors(out_dir / file_name, [(e.name, e.shape, np_dtype) for e in shard], produce)
    else:
      for e in shard:
        produce(e.name)
    log.info("wrote %s (%d tensors)", out_dir / file_name, len(shard))
  if writer and len(shards) > 1:
    index = {
        "metadata": {"total_size": sum(math.prod(e.shape) * np_dtype.itemsize for e in entries)},
        "weight_map": {e.name: file_name for file_name, shard in zip(names, shards) for e in shard},
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return names


def _source_dirs(checkpoint_dir: Path, config: ml_collections.ConfigDict) -> Iterator[Path]:
  """Where an export looks for the original config.json and tokenizer files, in order."""
  yield checkpoint_dir / TOKENIZER_SUBDIR
  yield checkpoint_dir
  tokenizer = config.get("data", {}).get("tokenizer", "")
  if tokenizer:
    yield Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
  init_from = config.model.get("init_from", "")
  if init_from:
    yield Path(init_from) / TOKENIZER_SUBDIR
    yield Path(init_from)


def _find_source_config(checkpoint_dir: Path, config) -> dict | None:
  for directory in _source_dirs(checkpoint_dir, config):
    for name in (SOURCE_CONFIG_NAME, "config.json"):
      if (directory / name).is_file():
        candidate = read_json_object(directory / name)
        if candidate.get("model_type") in FAMILY_TO_HF:  # not some other config.json
          return candidate
  return None


def _find_tokenizer_dir(checkpoint_dir: Path, config) -> Path | None:
  for directory in _source_dirs(checkpoint_dir, config):
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file():
      return directory
  return None


def export_checkpoint(
    checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, mesh=None, *,
    dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, step: int | None = None,
) -> Path:
  """cftjax checkpoint (parameter-only or a training workdir) -> HF model directory.

  Writes config.json, safetensors weights and the tokenizer files found next to the
  checkpoint (its tokenizer/ dir, data.tokenizer, or model.init_from). `dtype` defaults to
  the original model's torch_dtype, else the checkpoint's param_dtype.
  """
  checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
  require_empty_dir(out_dir)
  if mesh is None:
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))

  def target_for(config):
    return sharding.with_shardings(*model_abstract_params(ModelConfig.from_config(config.model), mesh))

  config, params = checkpoint.load_checkpoint(checkpoint_dir, target_for, step)
  family = model_config_family(config)
  model_config = ModelConfig.from_config(config.model)
  base = _find_source_config(checkpoint_dir, config)
  if dtype is None:
    dtype = (base or {}).get("torch_dtype") or (base or {}).get("dtype") or model_config.param_dtype
  save_hf_weights(params, model_config, out_dir, dtype, max_shard_bytes)
  if jax.process_index() == 0:
    hf_config = hf_config_dict(model_config, family, dtype, base)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    tokenizer_dir = _find_tokenizer_dir(checkpoint_dir, config)
    if tokenizer_dir is None:
      log.warning("no tokenizer files found for %s: copy them into %s yourself", checkpoint_dir, out_dir)
    else:
      copied = copy_tokenizer_files(tokenizer_dir, out_dir)
      log.info("copied %s from %s", ", ".join(copied), tokenizer_dir)
  return out_dir
