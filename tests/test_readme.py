"""The README's set-up commands stay true: CI runs exactly the documented test command."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
  return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
  readme = (REPO / "README.md").read_text()
  test_command = bash_blocks(readme.split("<!-- test-command -->", 1)[1])[0]
  ci_lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
  assert test_command in ci_lines


def test_readme_demo_command_trains_with_the_default_config():
  first = bash_blocks((REPO / "README.md").read_text())[0]
  assert first.endswith("python scripts/train.py") and "pip install -e ." in first
