"""What a config needs per device, before anything runs: the train step compiled ahead of
time from abstract shapes for the configured mesh, and XLA's memory analysis of it.

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs with
their shardings, so a 7B config compiles for a 16-chip mesh on a laptop with simulated
devices (XLA_FLAGS=--xla_force_host_platform_device_count=16 JAX_PLATFORMS=cpu). The CPU
compiler's buffer assignment is not the TPU's, so the temporaries are an estimate for
other backends; parameter, optimizer-state and batch bytes are exact.
"""

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cftjax import optim, sharding, train
from cftjax.data import sources as sources_lib
from cftjax.data.batch import TokenBatch

GIB = 1024**3
# Steps for the schedule when train.num_steps=-1: memory does not depend on it.
_PLACEHOLDER_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes per device (the largest shard where shardings are uneven)."""

  params: int
  opt_state: int
  batch: int
  temporaries: int  # XLA's temp_size_in_bytes: activations, gradients, workspace
  arguments: int  # XLA's argument_size_in_bytes (params + opt state + step + batch)
  outputs: int  # XLA's output_size_in_bytes
  aliased: int  # XLA's alias_size_in_bytes: outputs written into donated arguments
  generated_code: int
  capacity: int | None  # the device's memory when known (or given)
  mesh: dict
  rows_per_device: int
  micro_batch_rows: int

  @property
  def peak(self) -> int:
    """Live at once at worst: inputs, temporaries and the outputs not written in place."""
    return self.arguments + self.temporaries + self.outputs - self.aliased

  @property
  def fits(self) -> bool | None:
    return None if self.capacity is None else self.peak <= self.capacity


def _per_device_bytes(tree: Any) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


def device_capacity(device: jax.Device) -> int | None:
  """Bytes the device can hold, from its runtime (TPU, GPU); None on CPU."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> TokenBatch:
  rows, length = int(config.train.global_batch_size), int(config.data.max_length)
  return TokenBatch.abstract(rows, length, sharding.batch_sharding(mesh))


def compiled_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None):
  """(compiled train step, abstract state, abstract batch, mesh) for `config`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  accum = train.check_grad_accum(config, mesh)
  model, _ = train.build_model(config)
  num_steps = int(config.train.num_steps) if int(config.train.num_steps) > 0 else _PLACEHOLDER_STEPS
  tx, schedule = optim.make_optimizer(config.optim, num_steps)
  layout = train.state_layout(model, tx, mesh, config.seed)
  num_sources = len(sources_lib.parse_mixture(config.data.mixture))
  row_groups = train.resolve_row_groups(config, mesh, accum)
  steps = train.compile_steps(model, tx, schedule, mesh, layout, accum, num_sources, row_groups)
  batch = abstract_batch(config, mesh)
  compiled = sharding.on_mesh(steps.train.__wrapped__.lower, mesh)(layout.abstract, batch).compile()
  return compiled, layout.abstract, batch, mesh


def dry_run(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None, capacity: int | None = None
) -> MemoryReport:
  """Compiles the train step for `config` and reports its memory per device."""
  compiled, state, batch, mesh = compiled_train_step(config, devices)
  analysis = compiled.memory_analysis()
  if capacity is None:
    capacity = device_capacity(mesh.devices.flat[0])
  rows = sharding.batch_size_per_device(config.train.global_batch_size, mesh)
  return MemoryReport(
      params=_per_device_bytes(state["params"]),
      opt_state=_per_device_bytes(state["opt_state"]),
      batch=_per_device_bytes(batch),
      temporaries=int(analysis.temp_size_in_bytes),
      arguments=int(analysis.argument_size_in_bytes),
      outputs=int(analysis.output_size_in_bytes),
      aliased=int(analysis.alias_size_in_bytes),
      generated_code=int(analysis.generated_code_size_in_bytes),
      capacity=capacity,
      mesh=dict(mesh.shape),
      rows_per_device=rows,
      micro_batch_rows=rows // int(config.train.grad_accum_steps),
  )


def advice(report: MemoryReport, config: ml_collections.ConfigDict) -> list[str]:
  """What to change when the step does not fit (empty when it fits or capacity is unknown)."""
  if report.fits is not False:
    return []
  tips = []
  state = report.params + report.opt_state
  if report.temporaries > state:
    accum = int(config.train.grad_accum_steps)
    larger = [a for a in range(accum + 1, report.rows_per_device + 1) if report.rows_per_device % a == 0]
    if larger:
      tips.append(
          f"train.grad_accum_steps={larger[0]} (now {accum}): activations scale with the micro-batch "
          f"({report.micro_batch_rows} rows per device now)"
      )
    policy = config.model.remat_policy
    stronger = {"none": "dots_no_batch", "dots": "dots_no_batch", "dots_no_batch": "full"}.get(policy)
    if stronger:
      tips.append(f"model.remat_policy={stronger} (now {policy}): recompute layer activations in the backward pass")
    if not config.model.get("loss_chunk_size", 0):
      tips.append("model.loss_chunk_size=256 (now 0): never hold the whole [rows, length, vocab] logits")
  if report.mesh.get("fsdp", 1) == 1 and report.mesh.get("data", 1) > 1:
    tips.append("mesh.fsdp=-1 mesh.data=1: shard parameters and optimizer state over every device")
  tips.append("more devices: parameters and optimizer state shrink per device with mesh.fsdp")
  return tips


def _gib(n: int) -> str:
  return f"{n / GIB:8.2f} GiB"


def format_report(report: MemoryReport, config: ml_collections.ConfigDict) -> str:
  lines = [
      f"dry run: {config.get('name', '')} | mesh {report.mesh} | {report.rows_per_device} rows/device "
      f"({report.micro_batch_rows} per micro-batch) x {config.data.max_length} tokens",
      "per device (XLA memory analysis of the compiled train step):",
      f"  parameters        {_gib(report.params)}",
      f"  optimizer state   {_gib(report.opt_state)}",
      f"  batch             {_gib(report.batch)}",
      f"  temporaries       {_gib(report.temporaries)}   (activations, gradients, workspace)",
      f"  outputs not donated {_gib(report.outputs - report.aliased)}",
      f"  peak              {_gib(report.peak)}   (arguments + temporaries + outputs - aliased)",
  ]
  if report.capacity is None:
    lines.append("  capacity          unknown (CPU); pass --device_memory_gib=N to check a chip")
  else:
    verdict = "fits" if report.fits else "DOES NOT FIT"
    lines.append(f"  capacity          {_gib(report.capacity)}   -> {verdict}")
  tips = advice(report, config)
  if tips:
    lines.append("to fit, try:")
    lines.extend(f"  {tip}" for tip in tips)
  return "\n".join(lines)
