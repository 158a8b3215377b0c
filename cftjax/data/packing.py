"""Packing variable-length examples into fixed-length rows: best-fit decreasing over windows.

Grain's online packers (first-fit and best-fit) place each example as it arrives and emit
all their bins as soon as one example fits none of them, so every emitted group ends with
half-empty rows: on the pipeline benchmark's CFT corpus they fill 81% (8 bins) to 91% (256
bins) of a 2048-token row. Looking ahead fixes that. This packer reads a window of
examples, sorts them longest first and puts each into the open row it fills most tightly
(best-fit decreasing, within 11/9 of the optimal row count), then emits the rows in a
seeded random order so batch composition does not follow length: 95.7% on that corpus
with a window of 1024, close to what its lengths allow.

The iterator state is three small numbers plus the parent's state where the window began:
restoring re-reads and re-packs that window (deterministically) and skips the rows already
emitted, so a resumed run sees exactly the rows an uninterrupted one does.
"""

import bisect
from typing import Any, Sequence

import grain
import numpy as np

Example = dict[str, np.ndarray]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Groups item indices into bins of at most `capacity` total length.

  Items go longest first (ties by index, so the result is deterministic) into the bin whose
  free space is smallest but still enough; a new bin opens when none has room.
  """
  free: list[tuple[int, int]] = []  # (free space, bin index), sorted
  bins: list[list[int]] = []
  for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    length = lengths[item]
    if not 0 < length <= capacity:
      raise ValueError(f"item {item} has length {length}; packing needs 1..{capacity}")
    at = bisect.bisect_left(free, (length, -1))
    if at == len(free):
      bins.append([item])
      space, index = capacity - length, len(bins) - 1
    else:
      space, index = free.pop(at)
      bins[index].append(item)
      space -= length
    if space > 0:
      bisect.insort(free, (space, index))
  return bins


def pack_row(examples: Sequence[Example], max_length: int, length_key: str) -> Example:
  """Concatenates examples into one row padded with zeros to max_length.

  Adds `{length_key}_segment_ids` (1..k per example, 0 = padding) and
  `{length_key}_positions` (restarting at 0 per example). Every other feature is
  concatenated as is: per-token features line up with the tokens, and a short per-example
  feature (e.g. one outcome code) leaves its values at the row's start.
  """
  row = {}
  for key in examples[0]:
    values = np.concatenate([ex[key] for ex in examples])
    padded = np.zeros((max_length,) + values.shape[1:], values.dtype)
    padded[: len(values)] = values
    row[key] = padded
  lengths = [len(ex[length_key]) for ex in examples]
  used = sum(lengths)
  segments = np.zeros((max_length,), np.int32)
  segments[:used] = np.repeat(np.arange(1, len(examples) + 1, dtype=np.int32), lengths)
  positions = np.zeros((max_length,), np.int32)
  positions[:used] = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
  row[f"{length_key}_segment_ids"] = segments
  row[f"{length_key}_positions"] = positions
  return row


class WindowPackIterDataset(grain.IterDataset):
  """Packs each window of `window` parent examples into rows of `max_length` tokens.

  Examples are dicts of 1-D arrays; `length_key` gives an example's length (its other
  features must be no longer). An example longer than max_length is an error: truncate
  before packing.
  """

  def __init__(self, parent: grain.IterDataset, *, max_length: int, window: int, seed: int, length_key: str = "inputs"):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f"config key data.packing_window={window} must be >= 1")
    self._max_length, self._window, self._seed, self._length_key = max_length, window, seed, length_key

  def __iter__(self) -> "WindowPackIterator":
    return WindowPackIterator(
        self._parent.__iter__(),
        max_length=self._max_length,
        window=self._window,
        seed=self._seed,
        length_key=self._length_key,
    )

  def __str__(self) -> str:
    return f"WindowPackIterDataset(max_length={self._max_length}, window={self._window})"


class WindowPackIterator(grain.DatasetIterator):
  """Emits the rows of one window while reading the next one a little at a time: each row
  pulls its share of the next window's examples, so no call stalls for a whole window
  (only the first one, at start or after a restore)."""

  def __init__(self, parent: grain.DatasetIterator, *, max_length: int, window: int, seed: int, length_key: str):
    super().__init__(parent)
    self._max_length, self._window, self._seed, self._length_key = max_length, window, seed, length_key
    self._window_start = parent.get_state()  # where the current window's first example is
    self._window_index = 0
    self._next_row = 0  # rows of the current window already emitted
    self._reset_buffers()

  def _reset_buffers(self) -> None:
    self._examples: list[Example] | None = None  # the current window, read on first use
    self._rows: list[list[int]] = []  # example indices per row, in emission order
    self._ahead: list[Example] = []  # the next window's examples read so far
    self._ahead_start: dict[str, Any] | None = None  # where the next window begins
    self._parent_done = False

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._window_start, "window_index": self._window_index, "next_row": self._next_row}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._window_start = state["parent"]
    self._window_index = int(state["window_index"])
    self._next_row = int(state["next_row"])
    self._reset_buffers()

  def __next__(self) -> Example:
    if self._examples is None:
      self._start_window(self._read(self._window))
    if self._next_row >= len(self._rows):
      if not self._ahead and self._parent_done:
        raise StopIteration
      # The window is used up: the next one starts where reading ahead began.
      ahead = self._ahead + self._read(self._window - len(self._ahead))
      self._window_start, self._window_index, self._next_row = self._ahead_start, self._window_index + 1, 0
      self._start_window(ahead)
      if not self._rows:
        raise StopIteration
    row = pack_row([self._examples[i] for i in self._rows[self._next_row]], self._max_length, self._length_key)
    self._next_row += 1
    # Read this row's share of the next window.
    due = -(-self._window * self._next_row // len(self._rows))
    self._ahead += self._read(due - len(self._ahead))
    return row

  def _read(self, count: int) -> list[Example]:
    examples = []
    while len(examples) < count and not self._parent_done:
      try:
        example = next(self._parent)
      except StopIteration:
        self._parent_done = True
        break
      # Own copies: arrays from grain's worker processes live in shared memory, one open
      # file each, and a window buffers thousands of them.
      examples.append({key: np.array(value) for key, value in example.items()})
    return examples

  def _start_window(self, examples: list[Example]) -> None:
    lengths = [len(ex[self._length_key]) for ex in examples]
    for i, (ex, length) in enumerate(zip(examples, lengths)):
      if length > self._max_length or any(len(v) > length for v in ex.values()):
        shapes = {k: v.shape for k, v in ex.items()}
        raise ValueError(
            f"example {i} of packing window {self._window_index} does not fit a row of "
            f"{self._max_length} tokens (feature shapes {shapes}); truncate before packing"
        )
    rows = best_fit_decreasing(lengths, self._max_length)
    order = np.random.default_rng([self._seed, self._window_index]).permutation(len(rows))
    self._examples, self._rows = examples, [rows[i] for i in order]
    self._ahead, self._ahead_start = [], self._parent.get_state()
