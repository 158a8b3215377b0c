"""Orbax checkpoints: train state + data iterator state + config, restorable onto any mesh.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}` for training runs and
`<dir>/<step>/{params,config}` for parameter-only checkpoints (imports, exports). The
newest K steps are kept; optionally also the best K by a metric, combined so that the
newest checkpoint always survives (a BestN policy alone can delete it).

Restores fall back: when the newest step cannot be read (a file emptied by a full disk, a
directory left half-copied), one warning line names it and the next older step is tried;
with none readable, CheckpointError names every step and why. A step counts as damaged only
when an older one restores onto the same target, so a config that no longer fits the
checkpoints fails on the newest step instead of walking back through all of them.
"""

import contextlib
import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

T = TypeVar("T")
# What reading a damaged step raises: a missing item (KeyError), truncated JSON or tensor
# data (ValueError, including tensorstore's), missing files (OSError).
READ_ERRORS = (OSError, ValueError, KeyError, EOFError)
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(RuntimeError):
  """No checkpoint step in a directory could be restored."""


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _preservation_policy(checkpoint_config: Any):
  latest = policies.LatestN(n=int(checkpoint_config.keep))
  if not checkpoint_config.best_metric:
    return latest
  metric = checkpoint_config.best_metric
  if checkpoint_config.best_mode not in ("min", "max"):
    raise ValueError(f"config key checkpoint.best_mode={checkpoint_config.best_mode!r} is not 'min' or 'max'")
  minimize = checkpoint_config.best_mode == "min"
  worst = float("inf") if minimize else float("-inf")
  best = policies.BestN(
      # A checkpoint written under another best_metric ranks last instead of failing.
      get_metric_fn=lambda metrics: metrics.get(metric, worst),
      # BestN keeps the last n after sorting ascending; reverse for "min".
      reverse=minimize,
      n=int(checkpoint_config.keep_best),
      # Checkpoints without metrics (saved between evaluations, at the end, on SIGTERM)
      # are LatestN's to keep or delete; BestN keeping them would keep them forever.
      keep_checkpoints_without_metrics=False,
  )
  return policies.AnyPreservationPolicy([latest, best])


def make_manager(directory: str | Path, checkpoint_config: Any, with_data: bool = True) -> ocp.CheckpointManager:
  items = ("state", "data", "config") if with_data else ("state", "config")
  options = ocp.CheckpointManagerOptions(
      preservation_policy=_preservation_policy(checkpoint_config),
      enable_async_checkpointing=bool(checkpoint_config.async_save),
      create=True,
  )
  handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
  }
  if with_data:
    handlers["data"] = grain.checkpoint.CheckpointHandler()
  return ocp.CheckpointManager(Path(directory).absolute(), item_names=items, item_handlers=handlers, options=options)


def save_train_state(manager, step: int, state, data_iterator, config, metrics: dict | None = None) -> None:
  """Saves state + iterator + config; `metrics` (e.g. validation) rank it for best_metric."""
  best = config.checkpoint.best_metric
  if metrics is not None and best and best not in metrics:
    raise ValueError(
        f"config key checkpoint.best_metric={best!r} is not among the metrics of step {step}: {sorted(metrics)}"
    )
  args = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(config_to_json(config)),
  }
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)


def restore_train_state(manager, abstract_state, data_iterator, step: int | None = None):
  """Restores state onto the shardings in `abstract_state`, and the iterator in place.

  Without `step`, the newest readable step; newer damaged ones are moved aside to
  `<step>.damaged` (kept for inspection, never deleted): the run will save those step numbers
  again, and Orbax would otherwise keep taking the damaged step for the newest.
  """

  def restore(at_step: int):
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(at_step, args=ocp.args.Composite(**args))["state"]

  root = Path(manager.directory)
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  step, state, damaged = restore_newest_valid(root, steps, restore, "moved aside to <step>" + DAMAGED_SUFFIX)
  if damaged:
    if jax.process_index() == 0:
      for bad in damaged:
        move_aside(root / str(bad))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("cftjax_damaged_checkpoints_moved")
    manager.reload()
  return step, state


def restore_newest_valid(
    root: Path, steps: Sequence[int], restore: Callable[[int], T], damaged_note: str = "left in place"
) -> tuple[int, T, list[int]]:
  """(step, restore(step), the newer steps that failed) for the first of `steps` (newest first)
  that restores. Each failure is one warning line; if none restores, one CheckpointError."""
  failures: list[tuple[int, Exception]] = []
  for step in steps:
    try:
      with _quiet_unraisable():
        restored = restore(step)
    except READ_ERRORS as e:
      failures.append((step, e))
      continue
    for bad, error in failures:
      _warn(
          f"warning: checkpoint {root / str(bad)} is unreadable ({_one_line(error)}); "
          f"{damaged_note.replace('<step>', str(bad))}; using step {step}"
      )
    return step, restored, [bad for bad, _ in failures]
  if not failures:
    raise CheckpointError(f"no checkpoint steps in {root}")
  reasons = "; ".join(f"step {bad}: {_one_line(error)}" for bad, error in failures)
  raise CheckpointError(f"no checkpoint in {root} could be restored ({reasons})") from failures[0][1]


def move_aside(step_dir: Path) -> Path:
  """`<step>` -> `<step>.damaged` (or `.damaged-2`, ...): out of Orbax's sight, still on disk."""
  target = step_dir.with_name(step_dir.name + DAMAGED_SUFFIX)
  n = 1
  while target.exists():
    n += 1
    target = step_dir.with_name(f"{step_dir.name}{DAMAGED_SUFFIX}-{n}")
  step_dir.rename(target)
  return target


def _one_line(error: Exception, limit: int = 200) -> str:
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_unraisable():
  """A failed Orbax read leaves coroutines that print hundreds of traceback lines when they
  are collected; the failure itself is reported in one line instead."""
  previous = sys.unraisablehook
  sys.unraisablehook = lambda _: None
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


# ------------------------------------------------------------------------------ params only
def find_steps(directory: str | Path, step: int | None = None) -> tuple[Path, list[int]]:
  """A checkpoint root -> (root, steps to try, newest first): the given step or all of them."""
  root = Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"checkpoint directory {root} does not exist")
  if (root / "checkpoints").is_dir():  # a training workdir
    root = root / "checkpoints"
  steps = sorted((int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint steps (numbered subdirectories) in {root}")
  if step is None:
    return root, steps
  if step not in steps:
    raise FileNotFoundError(f"checkpoint step {step} not in {root}; available: {sorted(steps)}")
  return root, [step]


def find_step_dir(directory: str | Path, step: int | None = None) -> tuple[Path, int]:
  """A checkpoint root -> (root, step): the given step or the newest one."""
  root, steps = find_steps(directory, step)
  return root, steps[0]


def load_checkpoint(
    directory: str | Path, make_target: Callable[[ml_collections.ConfigDict], Any], step: int | None = None
) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of the given step, or of the newest readable one (damaged newer steps are
  reported and left in place: readers such as eval and export do not alter a run directory).
  `make_target(config)` gives the abstract params (with shardings) to restore onto."""
  root, steps = find_steps(directory, step)

  def restore(at_step: int):
    config = _load_config_at(root, at_step)
    return config, _load_params_at(root, at_step, make_target(config))

  _, (config, params), _ = restore_newest_valid(root, steps, restore)
  return config, params


def load_config(directory: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
  root, steps = find_steps(directory, step)
  return restore_newest_valid(root, steps, lambda at_step: _load_config_at(root, at_step))[1]


def _load_config_at(root: Path, step: int) -> ml_collections.ConfigDict:
  path = root / str(step) / "config"
  files = list(path.glob("*")) if path.is_dir() else []
  if not files:
    raise FileNotFoundError(f"no config saved in {path}")
  with ocp.CheckpointManager(root.absolute(), item_names=("config",)) as manager:
    data = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  if not isinstance(data, dict):  # an emptied file reads back as None
    raise ValueError(f"the config saved in {path} is empty or not a JSON object")
  return ml_collections.ConfigDict(data)


def save_params(directory: str | Path, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """A parameter-only checkpoint (HF imports, exported weights) that train and eval load."""
  with ocp.CheckpointManager(Path(directory).absolute(), item_names=("params", "config")) as manager:
    manager.save(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config_to_json(config))),
        force=True,
    )
    manager.wait_until_finished()


def load_params(directory: str | Path, abstract_params: Any, step: int | None = None) -> Any:
  """Params from a parameter-only checkpoint or a training checkpoint, onto the shardings
  given by `abstract_params` (ShapeDtypeStructs with .sharding): any mesh works. Without
  `step`, the newest readable step."""
  root, steps = find_steps(directory, step)
  return restore_newest_valid(root, steps, lambda at_step: _load_params_at(root, at_step, abstract_params))[1]


def _load_params_at(root: Path, step: int, abstract_params: Any) -> Any:
  step_dir = root / str(step)
  if (step_dir / "params").is_dir():
    with ocp.CheckpointManager(root.absolute(), item_names=("params",)) as manager:
      return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]
  if (step_dir / "state").is_dir():
    # Restore only the params subtree of a train state; skip optimizer moments.
    with ocp.CheckpointManager(root.absolute(), item_names=("state",)) as manager:
      target = {"params": abstract_params}
      restored = manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(
                  item=target,
                  restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                  partial_restore=True,
              )
          ),
      )
      return restored["state"]["params"]
  raise FileNotFoundError(f"{step_dir} holds neither 'params' nor 'state'")
