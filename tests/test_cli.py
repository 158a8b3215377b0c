"""Scripts report user mistakes in one `error:` line (exit 2) and keep tracebacks for bugs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cftjax import cli

REPO = Path(__file__).resolve().parent.parent


def run_script(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == cli.USER_ERROR_EXIT, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


def test_mistyped_config_key_names_it_and_suggests_the_key(tmp_path):
  line = one_error_line(run_script("scripts/train.py", f"--workdir={tmp_path}", "--config.train.num_step=5"))
  assert line == "error: unknown config key train.num_step (--config.train.num_step); did you mean train.num_steps?"
  assert not list(tmp_path.iterdir())


def test_mistyped_config_section_suggests_the_whole_key(tmp_path):
  line = one_error_line(run_script("scripts/train.py", f"--workdir={tmp_path}", "--config.trian.num_steps=5"))
  assert line.endswith("did you mean train.num_steps?")


def test_bad_config_value_names_key_and_value(tmp_path):
  line = one_error_line(run_script("scripts/train.py", f"--workdir={tmp_path}", "--config.train.num_steps=many"))
  assert line.startswith("error: bad value for config key train.num_steps=many: ")


def test_missing_checkpoint_directory_is_named(tmp_path):
  missing = tmp_path / "no_such_run"
  line = one_error_line(run_script("scripts/eval.py", f"--checkpoint={missing}"))
  assert line == f"error: checkpoint directory {missing} does not exist"


def test_missing_config_file_is_named(tmp_path):
  line = one_error_line(run_script("scripts/train.py", f"--workdir={tmp_path}", "--config=configs/nope.py"))
  assert "config file configs/nope.py does not exist" in line


def test_verbose_adds_the_traceback(tmp_path):
  proc = run_script("scripts/eval.py", f"--checkpoint={tmp_path / 'none'}", "--verbose")
  assert proc.returncode == cli.USER_ERROR_EXIT
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == f"error: checkpoint directory {tmp_path / 'none'} does not exist"


def test_errors_raised_inside_libraries_are_bugs():
  with pytest.raises(ValueError) as from_numpy:
    np.zeros(3).reshape(2, 2)
  assert cli.user_error_message(from_numpy.value) is None
  assert cli.user_error_message(TypeError("bug")) is None
  from cftjax import checkpoint

  with pytest.raises(ValueError) as ours:  # cftjax validating its input
    checkpoint._preservation_policy(type("C", (), {"keep": 1, "best_metric": "m", "best_mode": "low"})())
  assert "checkpoint.best_mode='low'" in cli.user_error_message(ours.value)
