"""Config and dependencies stay in step with the code: every optional config key the code
reads is declared (so `--config.a.b=v` can set it), and pyproject declares exactly the
third-party packages cftjax and the scripts import."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from configs import base

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "cftjax").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
TEST_SOURCES = sorted((REPO / "tests").rglob("*.py"))
# Helpers the tests import, and the scripts tests/scripts/ import as modules.
LOCAL_TEST_MODULES = {path.stem for path in TEST_SOURCES + sorted((REPO / "scripts").glob("*.py"))} | {"tests"}
CONFIG_READS = [
    re.compile(r"\bconfig\.(\w+)\.get\(\"(\w+)\""),  # config.data.get("x")
    re.compile(r"\b(data)(?:_config)?\.get\(\"(\w+)\""),  # data.get("x"), data_config.get("x")
]


def test_config_keys_read_with_get_are_declared_in_base():
  config, undeclared = base.get_config(), []
  for path in (REPO / "cftjax").rglob("*.py"):
    for pattern in CONFIG_READS:
      for section, key in pattern.findall(path.read_text()):
        if section in config and key not in config[section]:
          undeclared.append(f"{path.relative_to(REPO)}: {section}.{key}")
  assert not undeclared


def declared_distributions() -> set[str]:
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
  return {re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def imported_modules(path: Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - {"cftjax", "configs", "__future__"}


def test_every_imported_package_is_declared_and_every_declared_one_used():
  distributions = importlib.metadata.packages_distributions()
  imported = set()
  for path in SOURCES + TEST_SOURCES:
    for module in imported_modules(path) - LOCAL_TEST_MODULES:
      imported |= {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
  declared = declared_distributions()
  assert imported - declared == set(), "imported but not declared in pyproject.toml"
  # Tools run as commands (the test runner, the formatter); jax[tpu]/[cuda] extras repeat jax.
  runtime_only = {"pytest", "pytest-xdist", "pyink", "jax"}
  assert declared - imported - runtime_only == set(), "declared but never imported"
