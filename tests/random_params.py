"""Random parameters drawn on the host with numpy: tests get params of any model's shapes
without paying for a compiled init. Larger than the 0.02 init, so attention patterns are far
from uniform and any leak between examples shows in the logits."""

import jax
import numpy as np


def draw_params(abstract_params, seed: int = 0):
  """Norm scales near 1, unit-normal embeddings, 0.15-scaled projections."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "embedding":
      value = rng.standard_normal(leaf.shape)
    else:
      value = 0.15 * rng.standard_normal(leaf.shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_params)
