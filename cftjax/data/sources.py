"""Named record sources and the training mixture.

`data.mixture` lists sources with sampling weights, "name:weight[,name:weight]". With
`data.source=demo` the names are `demo_cft` and `demo_sft` (the embedded task's CFT and
SFT views of the same problems), `demo_drill` (arithmetic practice) and `demo_compare`
(comparison practice); with `data.source=tfds` they are datasets written by
`scripts/prepare_data.py` into `data.data_dir`.
"""

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from cftjax import files

DEMO_SOURCES = ("demo_cft", "demo_sft", "demo_drill", "demo_compare")


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  name: str
  weight: float


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  weight: float
  records: Sequence[dict]  # random access: len() and __getitem__ -> canonical record


def parse_mixture(spec: str) -> list[MixtureEntry]:
  entries = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    name, _, weight = part.partition(":")
    try:
      value = float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(f"config key data.mixture: weight {weight!r} of {name!r} is not a number") from None
    if value <= 0:
      raise ValueError(f"config key data.mixture: weight of {name!r} must be positive, got {value}")
    entries.append(MixtureEntry(name.strip(), value))
  if not entries:
    raise ValueError("config key data.mixture is empty; expected 'name:weight[,name:weight]'")
  names = [e.name for e in entries]
  if len(set(names)) != len(names):
    raise ValueError(f"config key data.mixture names a source twice: {spec!r}")
  return entries


def demo_config(data_config: Any):
  from cftjax.data import demo_task

  d = data_config.demo
  return demo_task.DemoConfig(
      seed=d.seed,
      num_train=d.num_train,
      num_validation=d.num_validation,
      num_test=d.num_test,
      min_steps=d.min_steps,
      max_steps=d.max_steps,
      error_fraction=d.error_fraction,
      train_error_fraction=d.train_error_fraction,
      train_step_error_rate=d.train_step_error_rate,
      flawed_critique_fraction=d.flawed_critique_fraction,
      vocab_size=d.vocab_size,
      min_value=d.min_value,
      max_value=d.max_value,
      max_start=d.max_start,
      max_add_operand=d.max_add_operand,
      max_multiplier=d.max_multiplier,
      error_kinds=_names(d.error_kinds, "data.demo.error_kinds"),
      arithmetic_slips=tuple(int(x) for x in _names(d.arithmetic_slips, "data.demo.arithmetic_slips")),
      drill_lines=d.drill_lines,
      compare_per_problem=d.compare_per_problem,
  )


def _names(spec: str, key: str) -> tuple[str, ...]:
  """A comma-separated config value as a tuple of its non-empty parts."""
  parts = tuple(p.strip() for p in str(spec).split(",") if p.strip())
  if not parts:
    raise ValueError(f"config key {key} is empty")
  return parts


def prepare(data_config: Any):
  """Builds what the configured source needs once (demo data + tokenizer); returns it."""
  if data_config.source == "demo":
    from cftjax.data import demo_task

    return demo_task.prepare_demo_data(data_config.data_dir, demo_config(data_config))
  if data_config.source == "tfds":
    return None
  raise ValueError(f"config key data.source={data_config.source!r} is not 'demo' or 'tfds'")


def _kept_with_run(checkpoint_dir: str | Path, relative: str, is_kept=Path.is_file) -> Path | None:
  """What a run kept beside its checkpoints (tokenizer/, demo_eval/...): under the given
  checkpoint directory or the run directory above it, or None."""
  checkpoint_dir = Path(checkpoint_dir)
  for directory in (checkpoint_dir, checkpoint_dir.parent):
    if is_kept(directory / relative):
      return directory / relative
  return None


def tokenizer_path(
    data_config: Any, prepared=None, checkpoint_dir: str | Path | None = None, build_demo: bool = True
) -> str:
  """The one place a run's tokenizer is found (training, evaluation, export): data.tokenizer;
  else, for a checkpoint, its own tokenizer/ directory (or its workdir's); else the demo's,
  built if `prepared` is not given and `build_demo`. Load it with tokenizer.load_tokenizer."""
  if data_config.get("tokenizer"):
    return data_config.tokenizer
  kept = None if checkpoint_dir is None else _kept_with_run(checkpoint_dir, "tokenizer", Path.is_dir)
  if kept is not None:
    return str(kept)
  if data_config.get("source") == "demo" and (prepared or build_demo):
    return str((prepared or prepare(data_config)).tokenizer_path)
  if checkpoint_dir is not None:
    raise FileNotFoundError(
        f"no tokenizer for {checkpoint_dir}: its config has no data.tokenizer and there is no "
        f"{Path(checkpoint_dir) / 'tokenizer'} directory"
    )
  raise ValueError(
      "config key data.tokenizer is empty: set it to a SentencePiece .model, a tokenizer.json "
      "or a model directory (an imported checkpoint keeps its tokenizer in <dir>/tokenizer)"
  )


KEPT_DEMO_DIR = "demo_eval"  # a run's copy of the demo splits it is evaluated on
KEPT_DEMO_SPLITS = ("validation", "test")


def keep_demo_records(prepared, workdir: str | Path) -> None:
  """Copy the demo's validation and test CFT records into workdir/demo_eval/ (once), so a
  checkpoint is evaluated on the text it was trained for, whatever the data code builds later."""
  for split in KEPT_DEMO_SPLITS:
    target = Path(workdir) / KEPT_DEMO_DIR / f"{split}.cft.jsonl"
    if not target.is_file():
      files.write_bytes_atomically(target, Path(prepared.paths["cft"][split]).read_bytes())


def demo_eval_records(data_config: Any, split: str, checkpoint_dir: str | Path | None = None) -> list[dict]:
  """A split's demo CFT records: the copy a checkpoint's run kept (`keep_demo_records`, in the
  checkpoint directory or the one above it), else the demo data as the code builds it now."""
  from cftjax.data import demo_task

  if checkpoint_dir is not None and split in KEPT_DEMO_SPLITS:
    kept = _kept_with_run(checkpoint_dir, f"{KEPT_DEMO_DIR}/{split}.cft.jsonl")
    if kept is not None:
      return demo_task.read_jsonl(kept)
  return prepare(data_config).records(split, "cft")


def load_sources(data_config: Any, split: str, prepared=None) -> list[Source]:
  entries = parse_mixture(data_config.mixture)
  sources = []
  for entry in entries:
    if data_config.source == "demo":
      if entry.name not in DEMO_SOURCES:
        raise ValueError(f"config key data.mixture: {entry.name!r} is not a demo source {DEMO_SOURCES}")
      prepared = prepared or prepare(data_config)
      records = prepared.records(split, entry.name.split("_")[1])
    else:
      from cftjax.data import tfds_builder

      records = tfds_builder.load_split(entry.name, data_config.data_dir, split)
    if len(records) == 0:
      raise ValueError(f"source {entry.name!r} has no examples in split {split!r}")
    sources.append(Source(entry.name, entry.weight, records))
  return sources
