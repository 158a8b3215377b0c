"""Orbax checkpoints: retention (newest + best), the data iterator, restoring onto another
mesh, async saves of donated state, parameter-only loads and saved configs."""

from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cftjax import checkpoint as ckpt
from configs import base


def make_config(**checkpoint) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.checkpoint.update({"keep": 2, "async_save": False, **checkpoint})
  return config


def tiny_state(value: float = 1.0, mesh=None) -> dict:
  state = {
      "step": jnp.asarray(3, jnp.int32),
      "params": {"w": jnp.full((4, 2), value, jnp.float32), "b": jnp.arange(2, dtype=jnp.float32) + value},
      "opt_state": {"mu": jnp.full((4, 2), -value, jnp.float32)},
  }
  if mesh is not None:
    state = jax.device_put(state, shardings_for(state, mesh))
  return state


def shardings_for(state, mesh):
  """Rows of every matrix split over the mesh's only axis; the rest replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, P("x") if np.ndim(x) == 2 else P()), state)


def abstract(state, mesh):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      shardings_for(state, mesh))


def mesh_of(n: int):
  return jax.make_mesh((n,), ("x",), devices=jax.devices()[:n])


def save_steps(manager, config, metrics_by_step: dict) -> list[int]:
  for step, metrics in metrics_by_step.items():
    ckpt.save_train_state(manager, step, tiny_state(), None, config, metrics)
  manager.wait_until_finished()
  return manager.all_steps()


def on_disk(directory: Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.parametrize("mode,values", [
    ("min", [5.0, 1.0, 4.0, 3.0, 6.0, 7.0]),  # best: step 2 (lowest)
    ("max", [0.1, 0.9, 0.3, 0.2, 0.05, 0.01]),  # best: step 2 (highest)
])
def test_retention_keeps_the_newest_and_the_best(tmp_path, mode, values):
  config = make_config(best_metric="val_loss", best_mode=mode, keep_best=1)
  with ckpt.make_manager(tmp_path, config.checkpoint, with_data=False) as manager:
    # The two newest are the two worst, and both survive next to the best.
    kept = save_steps(manager, config, {i: {"val_loss": v} for i, v in enumerate(values, start=1)})
    assert sorted(kept) == [2, 5, 6]
    # Saves without metrics (between evaluations, final, SIGTERM) are kept by recency only.
    kept = save_steps(manager, config, {7: None, 8: None, 9: None})
    assert sorted(kept) == [2, 8, 9]
    assert manager.latest_step() == 9
  assert on_disk(tmp_path) == [2, 8, 9]


def test_retention_without_best_metric_keeps_the_newest(tmp_path):
  config = make_config(keep=3)
  with ckpt.make_manager(tmp_path, config.checkpoint, with_data=False) as manager:
    assert sorted(save_steps(manager, config, {i: {"val_loss": float(i)} for i in range(1, 6)})) == [3, 4, 5]


def test_best_metric_missing_from_metrics_names_the_key(tmp_path):
  config = make_config(best_metric="val_loss_sft")
  with ckpt.make_manager(tmp_path, config.checkpoint, with_data=False) as manager:
    with pytest.raises(ValueError, match=r"checkpoint.best_metric='val_loss_sft'.*step 1.*val_loss"):
      ckpt.save_train_state(manager, 1, tiny_state(), None, config, {"val_loss": 1.0})


def test_bad_best_mode_names_the_key(tmp_path):
  with pytest.raises(ValueError, match="checkpoint.best_mode='lowest'"):
    ckpt.make_manager(tmp_path, make_config(best_metric="val_loss", best_mode="lowest").checkpoint)


def test_state_and_iterator_round_trip_onto_another_mesh(tmp_path):
  config = make_config()
  dataset = grain.MapDataset.range(40).shuffle(seed=7).map(lambda x: x * 10).to_iter_dataset().batch(3)
  iterator = iter(dataset)
  for _ in range(4):
    next(iterator)
  saved_state = tiny_state(2.0, mesh_of(2))
  with ckpt.make_manager(tmp_path, config.checkpoint) as manager:
    ckpt.save_train_state(manager, 4, saved_state, iterator, config)
    manager.wait_until_finished()
  expected_batches = [next(iterator) for _ in range(3)]

  # A fresh process would build a fresh iterator and a target on its own mesh (4 devices).
  fresh = iter(dataset)
  target = abstract(tiny_state(), mesh_of(4))
  with ckpt.make_manager(tmp_path, config.checkpoint) as manager:
    step, restored = ckpt.restore_train_state(manager, target, fresh)
  assert step == 4
  for batch in expected_batches:
    np.testing.assert_array_equal(next(fresh), batch)
  for got, want, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(saved_state), jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == spec.sharding


def test_async_save_survives_donating_the_state(tmp_path):
  """The train loop donates the state to the next step right after an async save."""
  config = make_config(async_save=True)
  state = tiny_state(5.0)
  expected = jax.device_get(state)
  overwrite = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 1, s), donate_argnums=0)
  with ckpt.make_manager(tmp_path, config.checkpoint, with_data=False) as manager:
    ckpt.save_train_state(manager, 1, state, None, config)
    state = overwrite(state)  # reuses the saved buffers while the save may still run
    manager.wait_until_finished()
    _, restored = ckpt.restore_train_state(manager, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), None)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_load_params_takes_only_params_from_a_training_checkpoint(tmp_path):
  config = make_config()
  with ckpt.make_manager(tmp_path / "checkpoints", config.checkpoint, with_data=False) as manager:
    for step in (1, 2):
      ckpt.save_train_state(manager, step, tiny_state(float(step)), None, config)
    manager.wait_until_finished()
  target = abstract(tiny_state(), mesh_of(2))["params"]
  params = ckpt.load_params(tmp_path, target)  # a workdir: its newest step
  assert set(params) == {"w", "b"}
  np.testing.assert_array_equal(np.asarray(params["w"]), np.full((4, 2), 2.0))
  assert params["w"].sharding == target["w"].sharding
  older = ckpt.load_params(tmp_path / "checkpoints", target, step=1)
  np.testing.assert_array_equal(np.asarray(older["b"]), [1.0, 2.0])
  loaded = ckpt.load_config(tmp_path)
  assert loaded.checkpoint.keep == 2 and loaded.model.hidden_size == config.model.hidden_size


def test_params_only_checkpoint_round_trip(tmp_path):
  config = make_config()
  params = tiny_state(3.0)["params"]
  ckpt.save_params(tmp_path / "export", params, config)
  loaded = ckpt.load_params(tmp_path / "export", abstract(tiny_state(), mesh_of(1))["params"])
  np.testing.assert_array_equal(np.asarray(loaded["w"]), np.asarray(params["w"]))
  assert ckpt.load_config(tmp_path / "export").to_dict() == config.to_dict()


def test_missing_checkpoints_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.find_step_dir(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
    ckpt.find_step_dir(tmp_path)
  (tmp_path / "5").mkdir()
  assert ckpt.find_step_dir(tmp_path) == (tmp_path, 5)
  with pytest.raises(FileNotFoundError, match=r"step 7 not in .*available: \[5\]"):
    ckpt.find_step_dir(tmp_path, 7)
