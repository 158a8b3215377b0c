"""Atomic writes: a stage's result file exists whole or not at all, so a rerun can trust it."""

import json
import os
import tempfile
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(
      "w", encoding="utf-8", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False
  ) as tmp:
    tmp.write(text)
  os.replace(tmp.name, path)


def write_json_atomically(path: str | Path, value) -> None:
  write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
