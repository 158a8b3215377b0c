"""Tolerances for comparing two float32 computations that differ only in summation order.

A sharded contraction adds per-device partial sums and all-reduces them; gradient
accumulation adds micro-batch sums; remat, scan and another processor's vectorisation
group a sum differently. Reordering a float32 sum of n terms moves it by about
EPS32 * sqrt(n) times the terms' magnitude (rounding errors add like a random walk;
Higham, "Accuracy and Stability of Numerical Algorithms", sec. 4.2), and sums in sequence
each add their share. Element-wise math is exact and stays compared exactly.
"""

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
# Sums in sequence per transformer layer, forward and backward: q/k/v/o projections,
# scores, softmax, attention-weighted values, gate/up/down, two norms (16 is an upper count).
SUMS_PER_LAYER = 16
SUMS_OUTSIDE_LAYERS = 4  # final norm, head, log-softmax, loss


def reorder_rtol(num_layers: int, longest_sum: int) -> float:
  """Relative difference a reduced quantity (loss, gradient leaf, norm) may show.

  longest_sum: the most terms one sum adds; for a kernel's gradient, the tokens of the
  batch (one outer product per token).
  """
  chained = SUMS_PER_LAYER * num_layers + SUMS_OUTSIDE_LAYERS
  return chained * EPS32 * float(np.sqrt(longest_sum))


def gradient_tolerance(grads_reference, rtol: float):
  """Per leaf: rtol of the leaf's largest gradient, as an absolute tolerance.

  Relative to the leaf, not the element: an element whose per-token terms cancel keeps the
  absolute rounding of the terms it was summed from (k_proj's bias gradient is all
  rounding: softmax cancels a bias shared by every key), so element-wise rtol cannot hold.
  """
  return jax.tree.map(lambda g: rtol * float(np.max(np.abs(g))), grads_reference)


def assert_gradients_close(got, want, rtol: float, where: str = ""):
  assert jax.tree.structure(got) == jax.tree.structure(want), where
  for (path, w), g, atol in zip(
      jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(gradient_tolerance(want, rtol))
  ):
    key = jax.tree_util.keystr(path)
    assert atol > 0, f"{where} {key}: no gradient reached this leaf"
    # A sum of no non-zero terms (an embedding row of a token absent from the batch) is 0
    # in any order.
    np.testing.assert_array_equal(g[w == 0], 0.0, err_msg=f"{where} {key} (zero gradients)")
    np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=f"{where} {key}")
