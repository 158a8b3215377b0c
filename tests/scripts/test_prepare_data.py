"""scripts/prepare_data.py end to end: a bad row fails with file:line, --skip_invalid builds and reports."""

import json
import subprocess
import sys
from pathlib import Path

from cftjax.data import tfds_builder

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_data.py"


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_prepare_data_cli_fails_on_bad_row_then_skips_and_reports(tmp_path):
  rows = [json.dumps({"query": f"q{i}", "response": f"r{i}", "critique": "ok\nConclusion: right"}) for i in range(6)]
  rows.insert(3, '{"query": "q", "response": "r"')  # line 4: malformed JSON
  source = tmp_path / "data.jsonl"
  source.write_text("\n".join(rows) + "\n")
  common = [f"--input={source}", "--name=cli_cft", f"--data_dir={tmp_path / 'out'}", "--validation_fraction=0"]

  failed = run_cli(*common)
  assert failed.returncode == 2
  assert f"error: {source}:4: malformed JSON" in failed.stderr
  assert "--skip_invalid" in failed.stderr

  done = run_cli(*common, "--skip_invalid")
  assert done.returncode == 0, done.stderr
  assert "format: triples (detected format 'triples'" in done.stdout
  assert "train: 6 examples" in done.stdout and "validation: 0 examples" in done.stdout
  assert "skipped: 1 rows" in done.stdout and f"{source}:4: malformed JSON" in done.stdout
  assert len(tfds_builder.load_split("cli_cft", tmp_path / "out", "train")) == 6
