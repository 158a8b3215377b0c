"""Scores over n sampled answers per prompt: unbiased pass@k and majority-vote accuracy."""

import math
from typing import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
  """P(at least one of k answers drawn without replacement from n, c of them correct, is
  correct) = 1 - C(n-c, k) / C(n, k): the unbiased estimator of Chen et al. (2021), which
  the naive 1 - (1 - c/n)^k is not."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> str | None:
  """The most frequent answer, answers grouped by `same` (e.g. math equivalence); ties go to
  the group seen first; None (nothing extracted) never wins over an answer."""
  groups: list[list[str]] = []
  for answer in answers:
    if answer is None:
      continue
    for group in groups:
      if same(group[0], answer):
        group.append(answer)
        break
    else:
      groups.append([answer])
  if not groups:
    return None
  return max(groups, key=len)[0]  # max keeps the first of equal lengths


def default_ks(n: int) -> list[int]:
  """1, 2, 4, ... up to n, and n itself."""
  ks = [1]
  while ks[-1] * 2 <= n:
    ks.append(ks[-1] * 2)
  return ks if ks[-1] == n else ks + [n]
