"""Users' JSON/JSONL files -> a TFDS ArrayRecord dataset of canonical records; reading it back.

No TensorFlow: the builder is a `tfds.core.GeneratorBasedBuilder` writing
ArrayRecord, and reading goes through `builder.as_data_source` (what
`tfds.data_source` calls), both of which work with tensorflow-datasets 4.9.10 alone.

The builder class is made per build (the dataset name is the user's --name) and
created with `skip_registration=True`, so any name works, building twice in one
process does not collide in tfds' global registry, and a name shared with a tfds
catalogue dataset never loads the catalogue's code. Reading uses
`tfds.builder_from_directory`, which needs no class at all.

Layout: `{data_dir}/{name}/1.0.0/` with one ArrayRecord file per split,
`features.json` (Text for every canonical key), `dataset_info.json` (split counts) and
`metadata.json` (format, sources with sha256, counts, skip report).

Rows are read three times: one validation/counting pass first (so a bad row fails
before anything is written, and empty splits - which tfds cannot write - are known
up front), then one pass per split while tfds writes. Nothing is held in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from cftjax.data import records as records_lib
from cftjax.data.records import Record, SkipReport

DATASET_VERSION = "1.0.0"
SCHEMA_TAG = "cftjax.canonical_records.v1"  # in metadata.json; load checks it
DEFAULT_VALIDATION_FRACTION = 0.01
TRAIN, VALIDATION = "train", "validation"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuildResult:
  name: str
  dataset_dir: str  # {data_dir}/{name}/{version}
  format: str
  format_note: str  # how the format was chosen (detection summary or "given")
  counts: dict[str, int]  # examples per split; 0 for a validation split that was not written
  skipped: SkipReport
  sources: list[dict[str, Any]]
  seconds: float


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """Which files feed which split, and how rows are routed.

  Hash mode (no validation files): every input feeds both splits and
  `records.assign_split` routes each row. File mode: each split reads its own files.
  """

  train_paths: tuple[str, ...]
  validation_paths: tuple[str, ...]
  validation_fraction: float | None  # None in file mode

  @property
  def mode(self) -> str:
    return "hash" if self.validation_fraction is not None else "files"

  def paths(self, split: str) -> tuple[str, ...]:
    return self.train_paths if split == TRAIN else self.validation_paths

  def keeps(self, split: str, record: Record) -> bool:
    if self.validation_fraction is None:
      return True
    return records_lib.assign_split(record, self.validation_fraction) == split


def make_split_plan(
    inputs: Sequence[str | os.PathLike],
    validation_inputs: Sequence[str | os.PathLike] = (),
    validation_fraction: float | None = None,
) -> SplitPlan:
  """Hash split of `inputs` unless separate validation files are given (not both)."""
  if not inputs:
    raise ValueError("no input files given")
  train_paths = tuple(os.fspath(p) for p in inputs)
  validation_paths = tuple(os.fspath(p) for p in validation_inputs)
  if validation_paths:
    if validation_fraction is not None:
      raise ValueError("pass either validation files or a validation fraction, not both")
    shared = sorted(set(train_paths) & set(validation_paths))
    if shared:
      raise ValueError(f"files given for both train and validation: {', '.join(shared)}")
    return SplitPlan(train_paths, validation_paths, None)
  fraction = DEFAULT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
  return SplitPlan(train_paths, train_paths, fraction)


def count_splits(plan: SplitPlan, format_name: str, skip_invalid: bool) -> tuple[dict[str, int], SkipReport]:
  """The validating pass: examples per split and what was skipped (raises InvalidRow unless skipping)."""
  report = SkipReport()
  counts = {TRAIN: 0, VALIDATION: 0}
  if plan.mode == "hash":
    for record in records_lib.iter_records(plan.train_paths, format_name, skip_invalid, report):
      counts[records_lib.assign_split(record, plan.validation_fraction)] += 1
  else:
    for split in (TRAIN, VALIDATION):
      counts[split] = sum(1 for _ in records_lib.iter_records(plan.paths(split), format_name, skip_invalid, report))
  return counts, report


def validate_name(name: str) -> str:
  if not _NAME_PATTERN.match(name):
    raise ValueError(f"dataset name {name!r} must be lower snake_case: a letter, then letters, digits or '_'")
  return name


def _builder_class(
    dataset_name: str, plan: SplitPlan, format_name: str, splits: Sequence[str], metadata: dict[str, Any]
) -> type[tfds.core.GeneratorBasedBuilder]:
  """A GeneratorBasedBuilder for this one build; see the module docstring for why per build."""

  class CanonicalRecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "cftjax canonical records (objective, query, response, critique, ...)."}
    # tfds 4.9.10 locates a builder's checksums file through `code_path`, which for a
    # class inside a package evaluates `importlib_resources.abc.Traversable`; that
    # backport is only installed on Python < 3.9, so it fails here. This builder
    # downloads nothing and has no checksums, and None is tfds' own "no code file".
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
      features = tfds.features.FeaturesDict({key: tfds.features.Text() for key in records_lib.CANONICAL_KEYS})
      return tfds.core.DatasetInfo(
          builder=self,
          features=features,
          metadata=tfds.core.MetadataDict(metadata),
          description=f"cftjax canonical records from {len(metadata['sources'])} {format_name} file(s).",
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # inputs are local files
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, Record]]:
      # Bad rows were counted (or raised) by the validating pass; skip them quietly here.
      for file_index, path in enumerate(plan.paths(split)):
        for ref, record in records_lib.iter_located_records([path], format_name, True, SkipReport()):
          if plan.keeps(split, record):
            yield f"{file_index}:{ref.line}", record

  return CanonicalRecordsBuilder


def _describe_sources(plan: SplitPlan) -> list[dict[str, Any]]:
  role = {p: ("train+validation (hash split)" if plan.mode == "hash" else TRAIN) for p in plan.train_paths}
  role.update({p: VALIDATION for p in plan.validation_paths if plan.mode == "files"})
  return [
      {"path": os.path.abspath(p), "sha256": records_lib.sha256_file(p), "bytes": os.path.getsize(p), "split": split}
      for p, split in role.items()
  ]


def _clear_existing(dataset_dir: Path, overwrite: bool) -> None:
  if not dataset_dir.exists():
    return
  if not overwrite:
    raise FileExistsError(f"a dataset already exists at {dataset_dir}; pass overwrite (--overwrite) to rebuild it")
  if not (dataset_dir / "dataset_info.json").exists():
    raise FileExistsError(f"{dataset_dir} exists but is not a prepared dataset; refusing to delete it")
  shutil.rmtree(dataset_dir)


def build_dataset(
    inputs: Sequence[str | os.PathLike],
    format: str,
    name: str,
    data_dir: str | os.PathLike,
    validation_fraction: float | None = None,
    skip_invalid: bool = False,
    validation_inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
) -> BuildResult:
  """Validates every row, then writes `{data_dir}/{name}/1.0.0` as ArrayRecord.

  format: one of records.FORMATS or "auto" (detected from the first rows of each file).
  validation_fraction: share of distinct queries routed to "validation" (default 0.01);
    exclusive with validation_inputs, whose files become the validation split as is.
  Raises InvalidRow on the first bad row unless skip_invalid, ValueError when a
  required split would be empty, FileExistsError if the dataset exists and not overwrite.
  """
  start = time.perf_counter()
  validate_name(name)
  plan = make_split_plan(inputs, validation_inputs, validation_fraction)
  all_paths = list(dict.fromkeys(plan.train_paths + plan.validation_paths))
  for path in all_paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"input file not found: {path}")
  if format == records_lib.AUTO:
    detection = records_lib.detect_format(all_paths)
    format_name, format_note = detection.format, detection.describe()
    log.info("%s", format_note)
  elif format in records_lib.FORMATS:
    format_name, format_note = format, "given"
  else:
    raise ValueError(f"unknown format {format!r}; expected auto or one of {records_lib.FORMATS}")

  counts, report = count_splits(plan, format_name, skip_invalid)
  if counts[TRAIN] == 0:
    raise ValueError(
        f"no valid training rows in {', '.join(plan.train_paths)} (format {format_name}; " f"{report.total} skipped)"
    )
  if plan.mode == "files" and counts[VALIDATION] == 0:
    raise ValueError(f"no valid rows in the validation files {', '.join(plan.validation_paths)}")
  splits = [split for split in (TRAIN, VALIDATION) if counts[split] > 0]
  if VALIDATION not in splits and plan.validation_fraction:
    log.warning("validation fraction %s selected no rows; writing no validation split", plan.validation_fraction)

  sources = _describe_sources(plan)
  metadata = {
      "schema": SCHEMA_TAG,
      "format": format_name,
      "format_note": format_note,
      "split_mode": plan.mode,
      "validation_fraction": plan.validation_fraction,
      "counts": counts,
      "skipped": report.to_dict(),
      "sources": sources,
  }
  data_dir = Path(data_dir)
  dataset_dir = data_dir / name / DATASET_VERSION
  _clear_existing(dataset_dir, overwrite)

  builder_cls = _builder_class(name, plan, format_name, splits, metadata)
  builder = builder_cls(data_dir=os.fspath(data_dir), file_format=tfds.core.FileFormat.ARRAY_RECORD)
  with tempfile.TemporaryDirectory(prefix="cftjax_tfds_downloads_") as download_dir:
    builder.download_and_prepare(download_dir=download_dir)  # keeps data_dir free of tfds' downloads/

  written = {split: builder.info.splits[split].num_examples for split in splits}
  expected = {split: counts[split] for split in splits}
  if written != expected:  # only if the inputs changed between the passes
    raise RuntimeError(f"wrote {written} examples but validated {expected}; did the input files change?")
  return BuildResult(
      name=name,
      dataset_dir=os.fspath(dataset_dir),
      format=format_name,
      format_note=format_note,
      counts=counts,
      skipped=report,
      sources=sources,
      seconds=time.perf_counter() - start,
  )


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """Random access to canonical records as str dicts (tfds returns Text as bytes).

  Supports len() and indexing, so `grain.MapDataset.source(RecordSource(...))` works;
  it pickles (it holds only the tfds data source) for Grain worker processes.
  """

  source: Any  # a tfds data source (ArrayRecordDataSource)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Record:
    length = len(self.source)
    if not -length <= index < length:
      raise IndexError(f"record index {index} out of range for {length} records")
    return decode_record(self.source[index % length])

  def __getitems__(self, indices: Sequence[int]) -> list[Record]:
    return [decode_record(example) for example in self.source.__getitems__(list(indices))]

  def __iter__(self) -> Iterator[Record]:
    for index in range(len(self)):
      yield self[index]


def decode_record(example: dict[str, Any]) -> Record:
  return {key: value.decode("utf-8") if isinstance(value, bytes) else str(value) for key, value in example.items()}


def dataset_dir_of(name: str, data_dir: str | os.PathLike) -> Path:
  return Path(data_dir) / validate_name(name) / DATASET_VERSION


def load_builder(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """The read-only builder of a dataset prepared by build_dataset (no builder class needed)."""
  dataset_dir = dataset_dir_of(name, data_dir)
  if not (dataset_dir / "dataset_info.json").exists():
    raise FileNotFoundError(
        f"no prepared dataset {name!r} under {data_dir} (looked for {dataset_dir}); "
        "create it with scripts/prepare_data.py"
    )
  builder = tfds.builder_from_directory(dataset_dir)
  schema = dict(builder.info.metadata or {}).get("schema")
  if schema != SCHEMA_TAG:
    raise ValueError(
        f"{dataset_dir} is not a cftjax records dataset (metadata schema {schema!r}, " f"expected {SCHEMA_TAG!r})"
    )
  return builder


def load_metadata(name: str, data_dir: str | os.PathLike) -> dict[str, Any]:
  """The build's metadata: format, sources (path, sha256), counts, skip report."""
  return dict(load_builder(name, data_dir).info.metadata)


def load_split(name: str, data_dir: str | os.PathLike, split: str) -> RecordSource:
  """Random access to one split ("train", "validation", or a tfds slice like "train[:10%]")."""
  builder = load_builder(name, data_dir)
  base_split = split.split("[", 1)[0]
  if base_split not in builder.info.splits:
    raise KeyError(f"dataset {name!r} has no split {base_split!r}; it has {sorted(builder.info.splits)}")
  return RecordSource(builder.as_data_source(split))
