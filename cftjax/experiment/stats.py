"""Confidence intervals for the experiment's proportions, and pooling over seeds."""

import math
from typing import Iterable, Mapping

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion (no continuity correction).

  Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a
  point at 0/n or n/n, which small test sets hit often. With no trials nothing is known:
  (0, 1).
  """
  if trials < 0 or successes < 0 or successes > trials:
    raise ValueError(f"wilson_interval needs 0 <= successes <= trials, got {successes}/{trials}")
  if trials == 0:
    return 0.0, 1.0
  p = successes / trials
  z2_n = z * z / trials
  center = (p + z2_n / 2) / (1 + z2_n)
  half = z * math.sqrt(p * (1 - p) / trials + z2_n / (4 * trials)) / (1 + z2_n)
  # At 0/n and n/n the bound is exactly 0 or 1; the formula leaves rounding noise there.
  low = 0.0 if successes == 0 else max(0.0, center - half)
  high = 1.0 if successes == trials else min(1.0, center + half)
  return low, high


def proportion(successes: int, trials: int) -> dict:
  """A proportion with its Wilson 95% interval: {"value", "low", "high", "successes", "trials"}."""
  low, high = wilson_interval(successes, trials)
  return {
      "value": successes / trials if trials else None,
      "low": low,
      "high": high,
      "successes": successes,
      "trials": trials,
  }


def pooled_counts(summaries: Iterable[Mapping[str, int]], keys: Iterable[str]) -> dict[str, int]:
  """Sums of integer counts (e.g. tp/fp/fn/tn, correct/n) over the seeds' summaries."""
  keys = tuple(keys)
  totals = dict.fromkeys(keys, 0)
  for summary in summaries:
    for key in keys:
      totals[key] += int(summary[key])
  return totals


def f1_score(tp: int, fp: int, fn: int) -> float:
  """F1 for the positive class; 0.0 where precision and recall are both undefined or 0."""
  denominator = 2 * tp + fp + fn
  return 2 * tp / denominator if denominator else 0.0
