"""Device mesh, logical-to-mesh axis rules, sharded initialisation and batch placement.

Parameters and optimizer state are created directly in their sharded layout (eval_shape
for the structure, then jit with out_shardings), so no host ever holds the full model.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters shard their embed dimension over fsdp and their
# head / mlp / vocab dimension over tensor; activations shard batch over data x fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, ...]:
  """Axis sizes from config (`mesh.data`, `mesh.fsdp`, `mesh.tensor`); one may be -1."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"config keys mesh.*: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config keys mesh.*: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"config keys mesh.*: {num_devices} devices are not divisible by the fixed axes "
          f"{dict(zip(MESH_AXES, sizes))}"
      )
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
        f"config keys mesh.*: {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
        f"devices but {num_devices} are present"
    )
  return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: shardings come from logical constraints and in/out shardings, not types.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def on_mesh(fn: Callable, mesh: Mesh, rules=LOGICAL_RULES) -> Callable:
  """`fn` called with `mesh` set and the logical axis rules active, so a jitted function
  traced inside resolves its logical constraints against this mesh. `__wrapped__` is `fn`
  (its `.lower` for ahead-of-time compiles)."""

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  return wrapped


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def fit_sharding_to_shape(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """Replicates every dimension that its mesh axes do not divide evenly.

  Fix: jit refuses a parameter sharding that does not divide the dimension, so a model
  with fewer kv heads than the tensor axis (Qwen2.5-7B: 4 kv heads, tensor=8) or a vocab
  the tensor axis does not divide (32001) could not be placed at all. Replicating that
  one dimension is what Megatron-style stacks do for kv heads; the rest stays sharded.
  """
  return NamedSharding(sharding.mesh, fit_spec_to_shape(sharding.spec, shape, sharding.mesh.shape))


def fit_spec_to_shape(spec: P, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> P:
  """`spec` for an array of `shape` (padded to its rank), each dimension its mesh axes do
  not divide left whole."""
  out = list(spec) + [None] * (len(shape) - len(spec))
  for dim, axes in enumerate(out):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if shape[dim] % int(np.prod([mesh_shape[n] for n in names])):
      out[dim] = None
  return P(*out)


def abstract_params_and_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES) -> tuple[Any, Any]:
  """(unboxed ShapeDtypeStruct tree, NamedSharding tree) for a boxed-param init function."""
  boxed = jax.eval_shape(init_fn)
  specs = nn.get_partition_spec(boxed)
  abstract = nn.meta.unbox(boxed)
  shardings = jax.tree.map(
      lambda s, a: fit_sharding_to_shape(s, a.shape), logical_to_shardings(specs, mesh, rules), abstract
  )
  return abstract, shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying their target shardings: what Orbax restores onto."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def path_names(path) -> tuple[str, ...]:
  """A pytree key path as names: ("layers", "attention", "q_proj", "kernel"); list items by index."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every host. Collective when the array spans
  processes: every process must call it."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shardings_like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (e.g. optimizer state) that embeds param-shaped subtrees.

  A leaf whose key path ends with a parameter's key path and has that parameter's shape
  gets the parameter's sharding (Adam's mu and nu); every other leaf is replicated.
  """
  by_path = {}
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_shardings)
  ):
    by_path[path_names(path)] = (tuple(leaf.shape), sharding)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = path_names(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over data x fsdp; sequence dimension kept whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_per_device(global_batch_size: int, mesh: Mesh) -> int:
  """Rows each device holds: the batch splits over data x fsdp (see `batch_sharding`)."""
  return int(global_batch_size) // (mesh.shape["data"] * mesh.shape["fsdp"])


def batch_size_per_process(global_batch_size: int, mesh: Mesh) -> int:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % shards:
    raise ValueError(
        f"config key train.global_batch_size={global_batch_size} must be divisible by " f"mesh data x fsdp = {shards}"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"config key train.global_batch_size={global_batch_size} must be divisible by the "
        f"process count {jax.process_count()}"
    )
  return global_batch_size // jax.process_count()


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
  """Each process's rows -> one global jax.Array per leaf (a `TokenBatch`'s fields), sharded
  over data x fsdp."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.tree.map(lambda v: jax.device_put(v, sharding), batch)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), batch)
