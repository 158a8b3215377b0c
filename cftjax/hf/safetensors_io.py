"""A small safetensors codec: 8-byte header size, JSON header, raw little-endian data.

It handles bfloat16 through ml_dtypes (numpy has no bf16), reads only the byte ranges a
shard needs (positioned reads) and writes a file without holding it in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

from cftjax.data.records import read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names <-> numpy dtypes (bf16 and fp8 come from ml_dtypes).
DTYPES = {
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
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
LOADABLE_DTYPES = {DTYPES[n] for n in ("F64", "F32", "F16", "BF16")}


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
    if entry.get("dtype") not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    begin, end = entry["data_offsets"]
    info = TensorInfo(name, path, DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin)
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
    path: Path,
    tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
) -> None:
  """Writes a safetensors file whose tensors `produce(name)` yields one at a time."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in tensors:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {
        "dtype": DTYPE_NAMES[np.dtype(dtype)],
        "shape": list(shape),
        "data_offsets": [offset, offset + nbytes],
    }
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
