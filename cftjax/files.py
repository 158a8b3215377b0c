"""Atomic writes: a file exists whole or not at all (a crash or a concurrent writer never
leaves a torn one), so a rerun, a resume or another host can trust what it finds."""

import json
import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, flushed to disk, then renames it."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
    tmp.write(data)
    tmp.flush()
    os.fsync(tmp.fileno())
  os.replace(tmp.name, path)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
  write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: str | os.PathLike, value) -> None:
  write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
