"""Orbax checkpoints: train state + data iterator state + config, restorable onto any mesh.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}` for training runs and
`<dir>/<step>/{params,config}` for parameter-only checkpoints (imports, exports). The
newest K steps are kept; optionally also the best K by a metric, combined so that the
newest checkpoint always survives (a BestN policy alone can delete it).
"""

import json
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


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
  """Restores state onto the shardings in `abstract_state`, and the iterator in place."""
  step = manager.latest_step() if step is None else step
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return step, restored["state"]


# ------------------------------------------------------------------------------ params only
def find_step_dir(directory: str | Path, step: int | None = None) -> tuple[Path, int]:
  """A checkpoint root -> (root, step): the given step or the newest one."""
  root = Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"checkpoint directory {root} does not exist")
  if (root / "checkpoints").is_dir():  # a training workdir
    root = root / "checkpoints"
  steps = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoint steps (numbered subdirectories) in {root}")
  if step is None:
    return root, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"checkpoint step {step} not in {root}; available: {steps}")
  return root, step


def load_config(directory: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
  root, step = find_step_dir(directory, step)
  path = root / str(step) / "config"
  files = list(path.glob("*")) if path.is_dir() else []
  if not files:
    raise FileNotFoundError(f"no config saved in {path}")
  with ocp.CheckpointManager(root.absolute(), item_names=("config",)) as manager:
    data = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return ml_collections.ConfigDict(data)


def save_params(directory: str | Path, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """A parameter-only checkpoint (HF imports, exported weights) that train and eval load."""
  with ocp.CheckpointManager(Path(directory).absolute(), item_names=("params", "config")) as manager:
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config_to_json(config))
        ),
        force=True,
    )
    manager.wait_until_finished()


def load_params(directory: str | Path, abstract_params: Any, step: int | None = None) -> Any:
  """Params from a parameter-only checkpoint or a training checkpoint, onto the shardings
  given by `abstract_params` (ShapeDtypeStructs with .sharding): any mesh works."""
  root, step = find_step_dir(directory, step)
  step_dir = root / str(step)
  if (step_dir / "params").is_dir():
    with ocp.CheckpointManager(root.absolute(), item_names=("params",)) as manager:
      return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]
  if (step_dir / "state").is_dir():
    # Restore only the params subtree of a train state; skip optimizer moments.
    with ocp.CheckpointManager(root.absolute(), item_names=("state",)) as manager:
      target = {"params": abstract_params}
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True,
          ))
      )
      return restored["state"]["params"]
  raise FileNotFoundError(f"{step_dir} holds neither 'params' nor 'state'")
