"""Wilson intervals against scipy's and against published values; pooling helpers."""

import pytest
from scipy import stats as scipy_stats

from cftjax.experiment import stats


@pytest.mark.parametrize("successes, trials", [(0, 10), (1, 10), (5, 10), (9, 10), (10, 10), (37, 200), (1, 1)])
def test_wilson_matches_scipy(successes, trials):
  expected = scipy_stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
  assert stats.wilson_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize(
    "successes, trials, low, high",
    [
        # Newcombe (1998), Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_values(successes, trials, low, high):
  assert stats.wilson_interval(successes, trials) == pytest.approx((low, high), abs=1e-4)


def test_wilson_edges_and_bad_input():
  assert stats.wilson_interval(0, 0) == (0.0, 1.0)  # no trials: nothing known
  low, high = stats.wilson_interval(0, 50)
  assert low == 0.0 and 0.0 < high < 0.1  # never collapses to a point, unlike Wald
  assert stats.wilson_interval(50, 50)[1] == 1.0
  for bad in ((3, 2), (-1, 2), (0, -1)):
    with pytest.raises(ValueError, match="successes <= trials"):
      stats.wilson_interval(*bad)


def test_proportion_pooling_and_f1():
  assert stats.proportion(3, 4)["value"] == 0.75 and stats.proportion(0, 0)["value"] is None
  pooled = stats.pooled_counts([{"tp": 1, "n": 4}, {"tp": 2, "n": 6}], ("tp", "n"))
  assert pooled == {"tp": 3, "n": 10}
  assert stats.f1_score(tp=2, fp=1, fn=1) == pytest.approx(2 / 3)
  assert stats.f1_score(0, 0, 0) == 0.0
