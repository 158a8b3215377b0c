"""Seeds pooled into one row; the Markdown table and JSON; the plots."""

import json

import pytest

from cftjax.experiment import report, stats


def critique(tp, fp, fn, tn, unparsed=0):
  n = tp + fp + fn + tn + unparsed
  return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "unparsed": unparsed, "n": n, "accuracy": (tp + tn) / n}


def stage(seed, correct, crit, self_crit):
  return {
      "seed": seed,
      "summary": {
          "answer": {"correct": correct, "n": 10, "accuracy": correct / 10},
          "critique": crit,
          "self_critique": self_crit,
      },
      "train": {"steps": 5, "token_budget": 100, "target_tokens": 40.0, "final_loss": 1.0, "mixture": "m"},
  }


def test_seeds_are_pooled_by_counts_with_a_wilson_interval(tmp_path):
  row = report.aggregate_arm(
      "cft_f0.2",
      [
          stage(0, 3, critique(4, 1, 1, 4), critique(0, 0, 5, 5)),
          stage(1, 6, critique(2, 2, 3, 3), critique(0, 0, 4, 5, unparsed=1)),
      ],
  )
  assert row["answer_accuracy"] == stats.proportion(9, 20)
  assert row["answer_accuracy"]["low"] == pytest.approx(stats.wilson_interval(9, 20)[0])
  assert row["critique_accuracy"]["successes"] == 4 + 4 + 2 + 3 and row["critique_accuracy"]["trials"] == 20
  assert row["critique_precision"] == stats.proportion(6, 9)  # tp / (tp + fp), pooled
  assert row["critique_recall"] == stats.proportion(6, 10)
  assert row["critique_f1"] == pytest.approx(stats.f1_score(6, 3, 4))
  assert row["self_critique_unparsed_rate"] == pytest.approx(1 / 20)
  assert row["self_critique_precision"]["value"] is None  # it never said "wrong"
  assert [s["answer_accuracy"] for s in row["per_seed"]] == [0.3, 0.6]

  json_path, md_path = report.write_tables(tmp_path, [row], {"num_test": 10})
  assert json.loads(json_path.read_text())["rows"][0]["arm"] == "cft_f0.2"
  table = md_path.read_text()
  assert "| cft_f0.2 | 0,1 | 0.450 [0.258, 0.658] |" in table
  assert "| cft_f0.2 | 0.300 / 0.600 |" in table  # the per-seed table shows the spread
  assert "n/a / 0.00 / 0.00" in table  # self-critique precision undefined, shown as such

  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "val_loss": 9.0}\n{"step": 2, "loss": 1.5}\n{"st')
  assert report.read_losses(metrics) == ([1, 2], [2.0, 1.5])
  for path in (
      report.plot_losses(tmp_path / "loss.png", {"cft_f0.2": [("cft_f0.2 seed 0", metrics)]}),
      report.plot_accuracy(tmp_path / "accuracy.png", [row]),
  ):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
