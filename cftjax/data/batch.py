"""The batch the train and eval steps take: one typed pytree of [B, L] arrays.

The packer emits its own features (`inputs_positions`, `inputs_segment_ids`, `stats`, ...);
`TokenBatch.from_packed` is the one place they become what the model and the loss read, and
the trainer shards a `TokenBatch` as one pytree (every field over data x fsdp rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class TokenBatch:
  """Every field is [B, L]; int32 except `weights`."""

  inputs: Any  # token ids the model reads
  positions: Any  # position of each token inside its own packed example
  segment_ids: Any  # packed example id per slot, 0 = padding
  targets: Any  # the next token, scored where weights > 0
  weights: Any  # float32 loss weight: 1 on target tokens (response / critique + end), else 0
  objective_ids: Any  # objectives.OBJECTIVES index of the example (sft / cft)
  source_ids: Any  # index of the example's data source in the mixture

  @classmethod
  def fields(cls) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)

  @classmethod
  def dtype(cls, field: str) -> type:
    return np.float32 if field == "weights" else np.int32

  @classmethod
  def from_packed(cls, packed: Mapping[str, np.ndarray]) -> TokenBatch:
    """The packer's features, renamed (its other features, such as stats, stay behind)."""
    return cls(
        inputs=packed["inputs"],
        positions=packed["inputs_positions"],
        segment_ids=packed["inputs_segment_ids"],
        targets=packed["targets"],
        weights=packed["weights"],
        objective_ids=packed["objective_ids"],
        source_ids=packed["source_ids"],
    )

  @classmethod
  def zeros(cls, rows: int, length: int) -> TokenBatch:
    """An all-padding host batch (weights 0), to fill in place."""
    return cls(**{name: np.zeros((rows, length), cls.dtype(name)) for name in cls.fields()})

  @classmethod
  def abstract(cls, rows: int, length: int, sharding: jax.sharding.Sharding | None = None) -> TokenBatch:
    """Shapes and dtypes only, for ahead-of-time compiles."""
    return cls(
        **{name: jax.ShapeDtypeStruct((rows, length), cls.dtype(name), sharding=sharding) for name in cls.fields()}
    )
