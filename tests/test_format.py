"""The tree is formatted by the project's formatter (pyink, configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_tree_is_pyink_formatted():
  result = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--quiet", str(ROOT)], capture_output=True, text=True, cwd=ROOT
  )
  assert result.returncode == 0, (
      "files not formatted; run `pyink .` from the repository root:\n" + result.stdout + result.stderr
  )
