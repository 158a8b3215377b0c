"""The Grain input pipeline: records -> packed, batched token rows.

  source -> shard by JAX process -> seeded shuffle (reseeded each epoch) -> epochs ->
  mixture -> format + tokenize -> truncate -> [multiprocess prefetch] -> best-fit pack
  (windows of examples, packing.py) -> batch

Every example leaves a trace: one that is too long is cut (prompt from the left, or the
target) or replaced by a one-token placeholder with zero loss weight, and the per-row
`stats` feature counts each outcome, so nothing disappears uncounted. The iterator's state
is a small dict saved with every checkpoint; restoring it replays exactly.
"""

import dataclasses
import functools
import signal
from typing import Any, Sequence

import grain
import numpy as np

from cftjax import objectives
from cftjax.data import packing as packing_lib
from cftjax.data import sources as sources_lib

TRUNCATION_POLICIES = ("drop", "truncate_prompt_left", "truncate_target")
# Per-example outcome codes carried in the `stats` feature.
KEPT, PROMPT_CUT, TARGET_CUT, DROPPED = 1, 2, 3, 4
OUTCOME_NAMES = {KEPT: "kept", PROMPT_CUT: "prompt_truncated", TARGET_CUT: "target_truncated", DROPPED: "dropped"}
TOKEN_FEATURES = ("inputs", "targets", "weights", "objective_ids", "source_ids")


def truncate(ids: list[int], mask: list[int], max_tokens: int, policy: str) -> tuple[list[int], list[int], int]:
  """Fits an example into max_tokens ids; returns (ids, mask, outcome code)."""
  if len(ids) <= max_tokens:
    return ids, mask, KEPT
  if policy == "drop":
    return [], [], DROPPED
  first_target = mask.index(1) if 1 in mask else len(ids)
  if policy == "truncate_prompt_left":
    prompt, target = ids[:first_target], ids[first_target:]
    room = max_tokens - len(target)
    if room >= 1:
      # Keep the most recent prompt tokens: the question sits at the end of the prompt.
      return prompt[len(prompt) - room :] + target, [0] * room + mask[first_target:], PROMPT_CUT
    # The target alone is too long: keep one prompt token and cut the target's tail.
    return (prompt[-1:] + target)[:max_tokens], ([0] + mask[first_target:])[:max_tokens], TARGET_CUT
  if policy == "truncate_target":
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if 1 not in mask[1:]:
      return [], [], DROPPED  # the prompt alone fills the row: nothing left to learn
    return ids, mask, TARGET_CUT
  raise ValueError(f"config key data.truncation={policy!r} is not one of {TRUNCATION_POLICIES}")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
  from cftjax.data import tokenizer

  return tokenizer.load_tokenizer(path)


@dataclasses.dataclass(frozen=True)
class EncodeExample:
  """record -> per-token features. Picklable (holds a path, loads the tokenizer lazily)."""

  tokenizer_path: str
  template: str
  max_length: int
  truncation: str
  default_system: str | None = None

  def __call__(self, item: tuple[int, dict]) -> dict[str, np.ndarray]:
    source_id, record = item
    tokenizer = _load_tokenizer(self.tokenizer_path)
    objective = objectives.objective_id(record["objective"])
    ids, mask = objectives.encode_example(record, tokenizer, self.template, self.default_system)
    # Inputs are ids[:-1] and targets ids[1:], so a row holds max_length + 1 ids.
    ids, mask, outcome = truncate(ids, mask, self.max_length + 1, self.truncation)
    if outcome == DROPPED:
      ids, mask = [tokenizer.pad_id or 0] * 2, [0, 0]
    n = len(ids) - 1
    return {
        "inputs": np.asarray(ids[:-1], np.int32),
        "targets": np.asarray(ids[1:], np.int32),
        "weights": np.asarray(mask[1:], np.float32),
        "objective_ids": np.full((n,), objective, np.int32),
        "source_ids": np.full((n,), source_id, np.int32),
        "stats": np.asarray([outcome], np.int32),
    }


@dataclasses.dataclass(frozen=True)
class _Tag:
  source_id: int

  def __call__(self, record):
    return (self.source_id, dict(record))


def record_dataset(
    sources: Sequence[sources_lib.Source],
    *,
    seed: int,
    num_epochs: int | None,
    shuffle: bool,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
  """Per-process, shuffled, repeated, mixed (source_id, record) dataset."""
  parts = []
  for source_id, source in enumerate(sources):
    ds = grain.MapDataset.source(source.records)
    # Shard first, so processes read disjoint examples whose union is the whole split.
    ds = ds[process_index::process_count]
    if shuffle:
      ds = ds.shuffle(seed=seed + source_id)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    parts.append(ds.map(_Tag(source_id)))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, weights=[s.weight for s in sources])


def pack_and_batch(
    ds: grain.IterDataset, *, max_length: int, rows: int, packing: bool, window: int, seed: int
) -> grain.IterDataset:
  if packing:
    # A row's `stats` holds one outcome code per example it packs, from the row's start.
    ds = packing_lib.WindowPackIterDataset(ds, max_length=max_length, window=window, seed=seed)
  else:
    ds = ds.map(_PadToLength(max_length))
  return ds.batch(rows, drop_remainder=False)


@dataclasses.dataclass(frozen=True)
class _PadToLength:
  max_length: int

  def __call__(self, ex):
    out = {}
    for k, v in ex.items():
      padded = np.zeros((self.max_length,), v.dtype)
      padded[: len(v)] = v
      out[k] = padded
    n = len(ex["inputs"])
    out["inputs_segment_ids"] = (np.arange(self.max_length) < n).astype(np.int32)
    out["inputs_positions"] = np.where(np.arange(self.max_length) < n, np.arange(self.max_length), 0).astype(np.int32)
    return out


def make_dataset(
    data_config: Any,
    sources: Sequence[sources_lib.Source],
    tokenizer_path: str,
    *,
    rows: int,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
  """The full pipeline for one process; `rows` = this process's rows per batch."""
  if data_config.truncation not in TRUNCATION_POLICIES:
    raise ValueError(f"config key data.truncation={data_config.truncation!r} is not one of {TRUNCATION_POLICIES}")
  for key in ("read_threads", "read_buffer_size", "worker_count"):
    if data_config[key] < 0:
      raise ValueError(f"config key data.{key}={data_config[key]} must be >= 0")
  ds = record_dataset(
      sources,
      seed=data_config.shuffle_seed,
      num_epochs=data_config.num_epochs if train else 1,
      shuffle=train,
      process_index=process_index,
      process_count=process_count,
  )
  encode = EncodeExample(
      tokenizer_path,
      data_config.chat_template,
      data_config.max_length,
      data_config.truncation,
      data_config.get("system_prompt") or None,
  )
  ds = ds.map(encode).to_iter_dataset(
      grain.ReadOptions(num_threads=data_config.read_threads, prefetch_buffer_size=data_config.read_buffer_size)
  )
  if train and data_config.worker_count > 0:
    # Workers tokenize; packing stays in the main process (pack after mp_prefetch).
    _mark_absl_flags_parsed()
    # One example's arrays are a few KB: pickling them is cheaper than a shared-memory
    # segment (and open file) per array, which halved worker throughput.
    ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 20))
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=data_config.worker_count, per_worker_buffer_size=data_config.worker_buffer_size
        ),
        worker_init_fn=_leave_signals_to_the_main_process,
    )
  return pack_and_batch(
      ds,
      max_length=data_config.max_length,
      rows=rows,
      packing=data_config.packing,
      window=data_config.packing_window,
      seed=data_config.shuffle_seed,
  )


def _leave_signals_to_the_main_process(worker_index: int, worker_count: int) -> None:
  """Ctrl-C (and a scheduler's SIGTERM) reach the whole process group. A worker killed by
  it would take the batches in flight with it; the main process instead saves a
  checkpoint at the next step boundary and then closes its workers."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _mark_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; scripts not using absl.app must mark them parsed.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with empty rows (zero weight) so every step has one shape."""
  have = next(iter(batch.values())).shape[0]
  if have == rows:
    return batch
  return {k: np.concatenate([v, np.zeros((rows - have,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def batch_stats(batch: dict[str, np.ndarray]) -> dict[str, float]:
  """Host-side counts: examples by outcome, padding share (packing efficiency)."""
  stats = batch["stats"]
  out = {name: float(np.sum(stats == code)) for code, name in OUTCOME_NAMES.items()}
  out["examples"] = float(np.sum(stats > 0))
  out["nonpad_fraction"] = float(np.mean(batch["inputs_segment_ids"] > 0))
  return out
