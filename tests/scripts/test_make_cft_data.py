"""scripts/make_cft_data.py end to end on a tiny random checkpoint (student = teacher)."""

import json
import subprocess
import sys
from pathlib import Path

from cftjax import cft_data
from test_cft_data import tiny_checkpoint, write_problems

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_cft_data.py"


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_make_cft_data_cli_writes_rows_and_summary(tmp_path):
  ckpt = tiny_checkpoint(tmp_path / "ckpt")
  problems = write_problems(tmp_path / "problems.jsonl")
  out = tmp_path / "cft.jsonl"
  common = [
      f"--problems={problems}",
      f"--student={ckpt}",
      f"--teacher={ckpt}",
      f"--out={out}",
      "--samples=2",
      "--max_new_tokens=4",
      "--batch_size=8",
  ]
  done = run_cli(*common)
  assert done.returncode == 0, done.stderr
  assert "3 problems" in done.stdout and "teacher = student" in done.stdout
  summary = json.loads(cft_data.summary_path(out).read_text())
  assert summary["rows_sampled"] == 6 and summary["rows_kept"] == len(out.read_text().splitlines())
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert all(
      {"instruction", "input", "output", "response_correct", "critique_verdict", "critique_agrees"} <= set(r)
      for r in rows
  )
