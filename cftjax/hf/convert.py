"""HF model directory -> our parameters (straight onto their shardings) and checkpoints,
and back: import_params / import_to_checkpoint, save_hf_weights / export_checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from cftjax import chat_templates, checkpoint, sharding
from cftjax.data import sources
from cftjax.data.records import read_json_object
from cftjax.hf.config import FAMILY_TO_HF, check_model_config, hf_config_dict, hf_model_config, model_config_family
from cftjax.hf.layout import IGNORED_SUFFIXES, ParamSource, hf_shape, param_sources, read_block, to_hf_layout
from cftjax.hf.safetensors_io import (
    DTYPES,
    FLOAT_DTYPE_NAMES,
    INDEX_FILE,
    LOADABLE_DTYPES,
    SINGLE_FILE,
    TensorInfo,
    index_hf_tensors,
    write_safetensors,
)
from cftjax.model import ModelConfig, Transformer, params_init_fn

log = logging.getLogger(__name__)

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
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def model_abstract_params(model_config: ModelConfig, mesh) -> tuple[Any, Any]:
  """(ShapeDtypeStruct tree, NamedSharding tree) of the model's parameters on `mesh`."""
  return sharding.abstract_params_and_shardings(params_init_fn(Transformer(model_config)), mesh)


def _match_tensors(
    sources: list[ParamSource],
    abstract_leaves: list,
    tensors: dict[str, TensorInfo],
    hf_dir: Path,
    tie_embeddings: bool,
) -> None:
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
      if info.dtype not in LOADABLE_DTYPES:
        raise ValueError(
            f"{info.path}: tensor {name!r} has dtype {info.dtype}; only float64/32/16 and "
            f"bfloat16 weights load (quantized checkpoints are not supported)"
        )
      used.add(name)
  ignorable = {n for n in tensors if n.endswith(IGNORED_SUFFIXES)}
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


def _import_leaf(
    source: ParamSource, leaf: jax.ShapeDtypeStruct, target_sharding, tensors: dict[str, TensorInfo], dtype: np.dtype
) -> jax.Array:
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
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    mesh,
    config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """HF model directory -> cftjax parameter checkpoint (Orbax, step 0) in `out_dir`.

  `config` supplies everything config.json does not decide (param_dtype, scan_layers, ...).
  Written: the Orbax steps, `tokenizer/` (tokenizer and generation files) and
  `hf_config.json` (the source config.json, reused by export). Returns the saved config,
  whose data.tokenizer points at `out_dir/tokenizer` and data.chat_template at the
  model's template (its own, else a named one).
  """
  hf_dir, out_dir = Path(hf_dir), Path(out_dir)
  require_empty_dir(out_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(hf_model_config(hf_dir, max_length=config.data.get("max_length")))
  model_config = ModelConfig.from_config(config.model)
  tokenizer_dir = out_dir / TOKENIZER_SUBDIR
  config.data.tokenizer = str(tokenizer_dir.absolute())
  config.data.chat_template = chat_templates.template_for_import(model_config_family(config), hf_dir)
  params = import_params(hf_dir, model_config, mesh)
  checkpoint.save_params(out_dir, params, config)
  if jax.process_index() == 0:
    copied = copy_tokenizer_files(hf_dir, tokenizer_dir)
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model")):
      log.warning("%s holds no tokenizer.json or tokenizer.model: set data.tokenizer yourself", hf_dir)
    shutil.copyfile(hf_dir / "config.json", out_dir / SOURCE_CONFIG_NAME)
  return config


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


def save_hf_weights(
    params: Any,
    model_config: ModelConfig,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
  """Writes `params` as HF safetensors (sharded above `max_shard_bytes`, with the index).

  One layer tensor at a time is gathered to the host. Every process must call this (the
  gathers are collective on multi-host meshes); process 0 writes. Returns the file names.
  """
  out_dir = Path(out_dir)
  if dtype not in FLOAT_DTYPE_NAMES:
    raise ValueError(f"export dtype {dtype!r} is not one of {sorted(FLOAT_DTYPE_NAMES)}")
  np_dtype = DTYPES[FLOAT_DTYPE_NAMES[dtype]]
  leaves = jax.tree_util.tree_leaves(params)
  sources = param_sources(params, model_config.num_layers)
  entries = _hf_tensors(sources, leaves)
  shards = _plan_shards(entries, np_dtype.itemsize, max_shard_bytes)
  names = (
      [SINGLE_FILE]
      if len(shards) == 1
      else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
  )
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
  """The tokenizer files to export: the run's own (found as training and evaluation find
  them), else those of the model it was initialised from."""
  candidates = []
  try:
    found = Path(sources.tokenizer_path(config.data, checkpoint_dir=checkpoint_dir, build_demo=False))
    candidates.append(found if found.is_dir() else found.parent)
  except (ValueError, FileNotFoundError):
    pass
  init_from = config.model.get("init_from", "")
  if init_from:
    candidates += [Path(init_from) / TOKENIZER_SUBDIR, Path(init_from)]
  for directory in candidates:
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file():
      return directory
  return None


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    mesh=None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    step: int | None = None,
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
