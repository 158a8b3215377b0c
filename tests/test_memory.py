"""The dry run: the train step compiled from abstract shapes reports what XLA's memory
analysis gives for the real step on real arrays, and exact per-device state bytes."""

import dataclasses

import jax
import numpy as np
import pytest

from cftjax import cli, memory, optim, sharding, train
from cftjax.data.batch import TokenBatch
from configs import demo

TINY = {
    "model.vocab_size": 512,
    "model.hidden_size": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.head_dim": 16,
    "model.intermediate_size": 64,
    "data.max_length": 64,
    "data.mixture": "demo_cft:1,demo_sft:1",
    "train.global_batch_size": 16,
    "train.grad_accum_steps": 1,
    "train.num_steps": 10,
    "mesh.data": 2,
    "mesh.fsdp": 4,
    "mesh.tensor": 1,
}


def tiny_config(**changes):
  config = demo.get_config()
  config.update_from_flattened_dict({**TINY, **changes})
  return config


def shard_bytes_on_first_device(tree) -> int:
  device = jax.devices()[0]
  return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_dry_run_matches_the_real_step_on_8_devices():
  assert len(jax.devices()) == 8
  config = tiny_config()
  report = memory.dry_run(config)
  assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
  assert report.rows_per_device == 2

  # The real state, allocated on the same mesh: its bytes on one device are the report's.
  mesh = sharding.make_mesh(config.mesh)
  model, _ = train.build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, 10)
  layout = train.state_layout(model, tx, mesh, config.seed)
  state = train.init_state(model, tx, mesh, config.seed, layout)
  assert report.params == shard_bytes_on_first_device(state["params"])
  assert report.opt_state == shard_bytes_on_first_device(state["opt_state"])

  # The step lowered from concrete arrays: XLA's analysis is the one the report gives.
  rng = np.random.default_rng(0)
  shape = (16, 64)
  host = TokenBatch(**{k: rng.integers(0, 2, size=shape).astype(TokenBatch.dtype(k)) for k in TokenBatch.fields()})
  batch = sharding.host_batch_to_global(host, mesh)
  steps = train.compile_steps(model, tx, schedule, mesh, layout, 1, 2, train.resolve_row_groups(config, mesh, 1))
  analysis = sharding.on_mesh(steps.train.__wrapped__.lower, mesh)(state, batch).compile().memory_analysis()
  assert report.temporaries == analysis.temp_size_in_bytes
  assert report.arguments == analysis.argument_size_in_bytes
  assert report.outputs == analysis.output_size_in_bytes
  assert report.aliased == analysis.alias_size_in_bytes
  assert report.batch == len(TokenBatch.fields()) * 2 * 64 * 4
  assert report.peak == report.arguments + report.temporaries + report.outputs - report.aliased


def test_cli_dry_run_prints_the_figures_and_advice_when_it_does_not_fit(capsys):
  config = tiny_config()
  with pytest.raises(SystemExit) as exit_info:
    cli.dry_run_main(config, device_memory_gib=1e-6)
  assert exit_info.value.code == 1
  out = capsys.readouterr().out
  figures = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
  report = memory.dry_run(config, capacity=1024)
  assert f"{report.temporaries / memory.GIB:8.2f} GiB" in figures["temporaries"]
  assert f"{report.peak / memory.GIB:8.2f} GiB" in figures["peak"]
  assert "DOES NOT FIT" in out
  assert "train.grad_accum_steps=2" in out  # 2 rows per device
  assert "model.remat_policy=dots_no_batch" in out  # from the demo's none
  fits = dataclasses.replace(report, capacity=memory.GIB)
  assert fits.fits and memory.advice(fits, config) == []
