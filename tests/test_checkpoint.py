"""Orbax checkpoints: retention (newest + best), the data iterator, restoring onto another
mesh, async saves of donated state, parameter-only loads and saved configs."""

import shutil
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
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings_for(state, mesh)
  )


def mesh_of(n: int):
  return jax.make_mesh((n,), ("x",), devices=jax.devices()[:n])


def save_steps(manager, config, metrics_by_step: dict) -> list[int]:
  for step, metrics in metrics_by_step.items():
    ckpt.save_train_state(manager, step, tiny_state(), None, config, metrics)
  manager.wait_until_finished()
  return manager.all_steps()


def on_disk(directory: Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.parametrize(
    "mode,values",
    [
        ("min", [5.0, 1.0, 4.0, 3.0, 6.0, 7.0]),  # best: step 2 (lowest)
        ("max", [0.1, 0.9, 0.3, 0.2, 0.05, 0.01]),  # best: step 2 (highest)
    ],
)
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
    _, restored = ckpt.restore_train_state(
        manager, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), None
    )
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
    ckpt.find_steps(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
    ckpt.find_steps(tmp_path)
  (tmp_path / "5").mkdir()
  (tmp_path / "3").mkdir()
  (tmp_path / "4.damaged").mkdir()
  assert ckpt.find_steps(tmp_path) == (tmp_path, [5, 3])
  with pytest.raises(FileNotFoundError, match=r"step 7 not in .*available: \[3, 5\]"):
    ckpt.find_steps(tmp_path, 7)


# ------------------------------------------------------------------------------ damaged steps
def empty_a_tensor_file(step_dir: Path) -> None:
  """What a full disk leaves: one file of the step's tensor store truncated to zero bytes."""
  (step_dir / "state" / "manifest.ocdbt").write_bytes(b"")


def half_write(step_dir: Path) -> None:
  """What an interrupted copy leaves: the step's tensor data never arrived."""
  shutil.rmtree(step_dir / "state" / "d")


def saved_steps(directory: Path, config, values=(1.0, 2.0, 3.0)) -> None:
  with ckpt.make_manager(directory, config.checkpoint, with_data=False) as manager:
    for step, value in enumerate(values, start=1):
      ckpt.save_train_state(manager, step, tiny_state(value), None, config)
    manager.wait_until_finished()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's failed reads
@pytest.mark.parametrize("damage", [empty_a_tensor_file, half_write])
def test_resume_falls_back_past_a_damaged_newest_step_and_moves_it_aside(tmp_path, capfd, damage):
  config = make_config(keep=3)
  saved_steps(tmp_path, config)
  damage(tmp_path / "3")
  capfd.readouterr()
  target = abstract(tiny_state(), mesh_of(1))
  with ckpt.make_manager(tmp_path, config.checkpoint, with_data=False) as manager:
    step, state = ckpt.restore_train_state(manager, target, None)
    assert step == 2 and manager.latest_step() == 2
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 2), 2.0))
    # The run saves step 3 again next to the damaged copy it set aside.
    ckpt.save_train_state(manager, 3, tiny_state(9.0), None, config)
    manager.wait_until_finished()
  err = capfd.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1, err
  assert f"checkpoint {tmp_path / '3'} is unreadable" in warnings[0]
  assert "moved aside to 3.damaged; using step 2" in warnings[0]
  assert "Traceback" not in err, err
  assert (tmp_path / "3.damaged" / "state").is_dir()  # kept for inspection
  assert on_disk(tmp_path) == [1, 2, 3]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's failed reads
def test_readers_fall_back_and_leave_the_damaged_step_in_place(tmp_path, capfd):
  config = make_config(keep=3)
  saved_steps(tmp_path, config)
  empty_a_tensor_file(tmp_path / "3")
  target = abstract(tiny_state(), mesh_of(1))["params"]
  loaded_config, params = ckpt.load_checkpoint(tmp_path, lambda _: target)
  np.testing.assert_array_equal(np.asarray(params["w"]), np.full((4, 2), 2.0))
  assert loaded_config.checkpoint.keep == 3
  np.testing.assert_array_equal(np.asarray(ckpt.load_params(tmp_path, target)["w"]), np.full((4, 2), 2.0))
  warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 2 and all("3 is unreadable" in w and "left in place; using step 2" in w for w in warnings)
  assert on_disk(tmp_path) == [1, 2, 3]
  # An explicit step is what the user asked for: no fallback.
  with pytest.raises(ckpt.CheckpointError, match=r"step 3: ValueError"):
    ckpt.load_params(tmp_path, target, step=3)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's failed reads
def test_no_readable_step_is_one_error_naming_each_step(tmp_path):
  config = make_config(keep=3)
  saved_steps(tmp_path, config, values=(1.0, 2.0))
  empty_a_tensor_file(tmp_path / "2")
  half_write(tmp_path / "1")
  with ckpt.make_manager(tmp_path, config.checkpoint, with_data=False) as manager:
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"no checkpoint in {tmp_path} could be restored " r"\(step 2: ValueError: .*; step 1: ValueError: .*\)",
    ):
      ckpt.restore_train_state(manager, abstract(tiny_state(), mesh_of(1)), None)
  assert on_disk(tmp_path) == [1, 2]  # nothing moved: no step is known good


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's failed reads
def test_a_target_that_fits_no_step_moves_nothing(tmp_path):
  """A changed model config fails on every step alike: that is not damage."""
  config = make_config(keep=3)
  saved_steps(tmp_path, config, values=(1.0, 2.0))
  wrong = tiny_state()
  wrong["params"]["w"] = jnp.zeros((5, 2), jnp.float32)
  with ckpt.make_manager(tmp_path, config.checkpoint, with_data=False) as manager:
    with pytest.raises(ckpt.CheckpointError, match="step 2: .*step 1: "):
      ckpt.restore_train_state(manager, abstract(wrong, mesh_of(1)), None)
  assert on_disk(tmp_path) == [1, 2]
