"""The results table (Markdown + JSON) and the plots, from the stages' result files.

Seeds are combined by pooling: each metric's counts (correct answers, tp/fp/fn/tn) are
summed over seeds and one Wilson interval is computed on the pooled counts. That interval
reflects test-sample noise over seeds x test problems; the spread between seeds is shown
beside it (each seed's value) rather than folded in.
"""

import json
from pathlib import Path
from typing import Sequence

from cftjax import files
from cftjax.experiment import stats

CRITIQUE_COUNTS = ("tp", "fp", "fn", "tn", "unparsed", "n")
METRICS = (  # (key in the aggregate, label in the table and plot)
    ("answer_accuracy", "answer acc"),
    ("critique_accuracy", "critique acc"),
    ("self_critique_accuracy", "self-critique acc"),
)


def _critique_metrics(prefix: str, counts: dict) -> dict:
  tp, fp, fn, tn = (counts[k] for k in ("tp", "fp", "fn", "tn"))
  return {
      f"{prefix}_accuracy": stats.proportion(tp + tn, counts["n"]),
      f"{prefix}_precision": stats.proportion(tp, tp + fp),
      f"{prefix}_recall": stats.proportion(tp, tp + fn),
      f"{prefix}_f1": stats.f1_score(tp, fp, fn),
      f"{prefix}_unparsed_rate": counts["unparsed"] / counts["n"],
      f"{prefix}_counts": counts,
  }


def aggregate_arm(name: str, stage_results: Sequence[dict]) -> dict:
  """One table row from an arm's per-seed results (each {"seed", "summary", "train"})."""
  if not stage_results:
    raise ValueError(f"aggregate_arm: arm {name!r} has no results")
  summaries = [r["summary"] for r in stage_results]
  answers = stats.pooled_counts((s["answer"] for s in summaries), ("correct", "n"))
  row = {
      "arm": name,
      "seeds": [r["seed"] for r in stage_results],
      "answer_accuracy": stats.proportion(answers["correct"], answers["n"]),
  }
  row.update(_critique_metrics("critique", stats.pooled_counts((s["critique"] for s in summaries), CRITIQUE_COUNTS)))
  row.update(
      _critique_metrics("self_critique", stats.pooled_counts((s["self_critique"] for s in summaries), CRITIQUE_COUNTS))
  )
  row["per_seed"] = [
      {
          "seed": r["seed"],
          "answer_accuracy": r["summary"]["answer"]["accuracy"],
          "critique_accuracy": r["summary"]["critique"]["accuracy"],
          "self_critique_accuracy": r["summary"]["self_critique"]["accuracy"],
      }
      for r in stage_results
  ]
  row["train"] = [r["train"] for r in stage_results]
  return row


def _ci(p: dict) -> str:
  if p["value"] is None:
    return "n/a"
  return f"{p['value']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"


def _seeds(row: dict) -> str:
  return ",".join("-" if s is None else str(s) for s in row["seeds"])


def _per_seed(row: dict, key: str) -> str:
  return " / ".join(f"{s[key]:.3f}" for s in row["per_seed"]) if len(row["per_seed"]) > 1 else ""


def _prf(row: dict, prefix: str) -> str:
  p, r = row[f"{prefix}_precision"], row[f"{prefix}_recall"]
  show = lambda x: "n/a" if x["value"] is None else f"{x['value']:.2f}"
  return f"{show(p)} / {show(r)} / {row[f'{prefix}_f1']:.2f}"


def markdown_table(rows: Sequence[dict], meta: dict) -> str:
  lines = [
      "| arm | seeds | answer acc [95% CI] | critique acc [95% CI] | critique P / R / F1 | "
      "self-critique acc [95% CI] | self P / R / F1 | target tokens | token slots |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    target = sum(t["target_tokens"] for t in row["train"]) / len(row["train"])
    slots = row["train"][0]["token_budget"]
    lines.append(
        f"| {row['arm']} | {_seeds(row)} | {_ci(row['answer_accuracy'])} | "
        f"{_ci(row['critique_accuracy'])} | {_prf(row, 'critique')} | {_ci(row['self_critique_accuracy'])} | "
        f"{_prf(row, 'self_critique')} | {target:,.0f} | {slots:,} |"
    )
  multi = [row for row in rows if len(row["per_seed"]) > 1]
  if multi:
    lines += [
        "",
        "Per seed (answer / critique / self-critique accuracy, seeds in the order listed):",
        "",
        "| arm | answer acc | critique acc | self-critique acc |",
        "|---|---|---|---|",
    ]
    for row in multi:
      lines.append(
          f"| {row['arm']} | {_per_seed(row, 'answer_accuracy')} | {_per_seed(row, 'critique_accuracy')} | "
          f"{_per_seed(row, 'self_critique_accuracy')} |"
      )
  notes = [
      "",
      f"{meta['num_test']} held-out test problems per seed. Accuracies pool the counts of all seeds; the "
      "interval is Wilson's 95% score interval on the pooled counts (test-sample noise; see the per-seed "
      "values for the spread between seeds). P / R / F1: precision / recall / F1 for finding wrong "
      "responses (the positive class); an unparseable verdict counts as not finding it. Self-critique: the "
      "arm critiques its own direct answers, labelled by grading those answers. Target tokens: supervised "
      "(loss) tokens per run; token slots: steps x rows x row length, equal for every arm.",
  ]
  return "\n".join(lines + notes) + "\n"


def write_tables(workdir: str | Path, rows: Sequence[dict], meta: dict) -> tuple[Path, Path]:
  workdir = Path(workdir)
  json_path, md_path = workdir / "results.json", workdir / "results.md"
  files.write_json_atomically(json_path, {"meta": meta, "rows": list(rows)})
  files.write_text_atomically(md_path, markdown_table(rows, meta))
  return json_path, md_path


# ------------------------------------------------------------------------------ plots
def read_losses(metrics_path: str | Path) -> tuple[list[int], list[float]]:
  steps, losses = [], []
  for line in Path(metrics_path).read_text().splitlines():
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line torn by a kill
    if "loss" in entry:
      steps.append(int(entry["step"]))
      losses.append(float(entry["loss"]))
  return steps, losses


def plot_losses(path: str | Path, curves: dict[str, list[tuple[str, Path]]]) -> Path:
  """curves: arm -> [(run label, metrics.jsonl)]; one colour per arm, one line per seed."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8, 4.5), layout="constrained")
  ax = fig.add_subplot()
  for index, (arm, runs) in enumerate(curves.items()):
    color = f"C{index % 10}"
    for run_index, (label, metrics_path) in enumerate(runs):
      steps, losses = read_losses(metrics_path)
      ax.plot(
          steps,
          losses,
          color=color,
          alpha=0.85,
          linewidth=1.2,
          linestyle=("-", "--", ":", "-.")[run_index % 4],
          label=label,
      )
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (token mean over its own targets)")
  ax.set_yscale("log")
  ax.set_title("Training loss per stage")
  ax.legend(fontsize=7, ncols=2)
  fig.savefig(path, dpi=120)
  return Path(path)


def plot_accuracy(path: str | Path, rows: Sequence[dict]) -> Path:
  """Grouped bars: each metric per arm, with Wilson 95% error bars."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.5), layout="constrained")
  ax = fig.add_subplot()
  width = 0.8 / len(METRICS)
  for m_index, (key, label) in enumerate(METRICS):
    xs = [a + (m_index - (len(METRICS) - 1) / 2) * width for a in range(len(rows))]
    values = [row[key]["value"] or 0.0 for row in rows]
    errors = [
        [v - row[key]["low"] for v, row in zip(values, rows)],
        [row[key]["high"] - v for v, row in zip(values, rows)],
    ]
    ax.bar(xs, values, width, yerr=errors, capsize=3, label=label, color=f"C{m_index}")
  ax.set_xticks(range(len(rows)), [row["arm"] for row in rows])
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy (95% Wilson interval)")
  ax.set_title("Held-out test problems")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120)
  return Path(path)
