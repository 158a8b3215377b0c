"""What each stage trains on, derived purely from the experiment config.

Every stage starts from the same recipe (configs/demo.py unless overridden), so model,
optimizer, batch and schedule follow the demo. The base stage changes only its data (the
base pool, see base_data.py) and its length; arms start from the base checkpoint and differ
from each other only in ARM_KEYS: the data they see and the objective(s) it carries, and
the seed (parameter RNG and data order).
"""

import dataclasses
from pathlib import Path

import ml_collections

from cftjax.data import sources

# The only keys in which two arms' training configs may differ.
ARM_KEYS = ("name", "seed", "data.shuffle_seed", "data.mixture", "data.demo.flawed_critique_fraction")
KINDS = ("sft", "cft", "mix")
# What an arm of each kind trains in place of the recipe's demo_cft / demo_sft records.
_OBJECTIVE_SOURCES = {"sft": ("demo_sft",), "cft": ("demo_cft",), "mix": ("demo_cft", "demo_sft")}


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  kind: str  # sft | cft | mix
  flawed_critique_fraction: float | None  # None for sft: its records hold no critique

  @property
  def name(self) -> str:
    if self.flawed_critique_fraction is None:
      return self.kind
    return f"{self.kind}_f{self.flawed_critique_fraction:g}"

  def mixture(self, recipe_mixture: str) -> str:
    """The recipe's mixture with its objective records (demo_cft, demo_sft) replaced by this
    arm's, at their total weight, split evenly; the rest (practice: demo_compare,
    demo_drill) kept as it is, so every arm practises alike and only the objective differs."""
    entries = sources.parse_mixture(recipe_mixture)
    objective = {name for names in _OBJECTIVE_SOURCES.values() for name in names}
    share = sum(entry.weight for entry in entries if entry.name in objective) or 1.0
    own = _OBJECTIVE_SOURCES[self.kind]
    parts = [f"{name}:{share / len(own):g}" for name in own]
    parts += [f"{entry.name}:{entry.weight:g}" for entry in entries if entry.name not in objective]
    return ",".join(parts)


def parse_arms(spec: str) -> list[ArmSpec]:
  """ "sft,cft:0,cft:0.2,mix:0.2" -> ArmSpecs; a CFT or mix arm names its flawed fraction."""
  arms = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    kind, _, fraction = part.partition(":")
    if kind not in KINDS:
      raise ValueError(f"config key arms: {part!r} is not one of {KINDS} (e.g. 'cft:0.2')")
    if kind == "sft":
      if fraction:
        raise ValueError(f"config key arms: {part!r}: an sft arm has no critiques, so no flawed fraction")
      arms.append(ArmSpec("sft", None))
      continue
    try:
      value = float(fraction)
    except ValueError:
      raise ValueError(f"config key arms: {part!r} needs a flawed-critique fraction, e.g. '{kind}:0.2'") from None
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"config key arms: flawed-critique fraction in {part!r} must be in [0, 1]")
    arms.append(ArmSpec(kind, value))
  if not arms:
    raise ValueError("config key arms is empty; e.g. 'sft,cft:0,cft:0.2,cft:0.4,mix:0.2'")
  names = [a.name for a in arms]
  if len(set(names)) != len(names):
    raise ValueError(f"config key arms names an arm twice: {spec!r}")
  return arms


def parse_seeds(spec: str) -> list[int]:
  try:
    seeds = [int(s) for s in str(spec).split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"config key seeds={spec!r} is not a comma-separated list of integers") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config key seeds={spec!r} must name at least one seed, each once")
  return seeds


def _stage_common(recipe: ml_collections.ConfigDict, tokenizer_path: str, num_steps: int) -> ml_collections.ConfigDict:
  """The recipe with what every stage shares: one tokenizer, its own length, and no
  in-training generation metric (the experiment evaluates every stage itself)."""
  config = ml_collections.ConfigDict(recipe.to_dict())
  if config.data.source != "demo":
    raise ValueError(f"config key recipe.data.source={config.data.source!r}: the experiment runs on the demo task")
  # Every arm's demo cache trains its own tokenizer; all stages must share one vocabulary.
  config.data.tokenizer = tokenizer_path
  config.train.num_steps = int(num_steps)
  config.train.eval_generation_examples = 0
  config.checkpoint.best_metric = ""  # keep the newest: the final step is the stage's result
  return config


def base_config(
    recipe: ml_collections.ConfigDict, tokenizer_path: str, base_data_dir: str | Path, dataset_name: str, num_steps: int
) -> ml_collections.ConfigDict:
  """The base stage: the recipe trained on the base pool's SFT records (a tfds dataset)."""
  config = _stage_common(recipe, tokenizer_path, num_steps)
  config.name = "experiment-base"
  config.data.source = "tfds"
  config.data.data_dir = str(base_data_dir)
  config.data.mixture = f"{dataset_name}:1"
  return config


def arm_config(
    recipe: ml_collections.ConfigDict,
    arm: ArmSpec,
    seed: int,
    base_checkpoint: str | Path,
    tokenizer_path: str,
    num_steps: int,
) -> ml_collections.ConfigDict:
  """One arm's training config: the recipe from the base checkpoint; data, objective and
  seed are the arm's own, everything else is shared."""
  config = _stage_common(recipe, tokenizer_path, num_steps)
  config.name = f"experiment-{arm.name}-s{seed}"
  config.seed = int(seed)
  config.data.shuffle_seed = int(seed)
  config.data.mixture = arm.mixture(recipe.data.mixture)
  if arm.flawed_critique_fraction is not None:
    config.data.demo.flawed_critique_fraction = float(arm.flawed_critique_fraction)
  config.model.init_from = str(base_checkpoint)
  return config


def token_budget(config: ml_collections.ConfigDict) -> int:
  """Token slots a training run processes: steps x packed rows x row length."""
  return int(config.train.num_steps) * int(config.train.global_batch_size) * int(config.data.max_length)


def differing_keys(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> set[str]:
  """Flattened keys ("data.mixture") whose values differ between two configs."""
  flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
  return {k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k, _MISSING) != flat_b.get(k, _MISSING)}


_MISSING = object()


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
