"""Checkpoint selection: every kept step of a run scored on every benchmark, a table with
the best step by one benchmark, and the side-by-side table of several runs (CFT vs SFT).

Layout under a run directory:
  eval/steps/<step>/<benchmark>/math_summary.json (+ per-example rows)   one per pair
  eval/table.json, eval/table.md                                          rows = steps
A rerun scores only the (step, benchmark) pairs whose summary is missing.
"""

import json
from pathlib import Path
from typing import Callable, Sequence

from cftjax import checkpoint
from cftjax.evaluators import benchmark_name

SUMMARY = "math_summary.json"


def kept_steps(run_dir: str | Path) -> list[int]:
  root, _ = checkpoint.find_step_dir(run_dir)
  return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def eval_dir(run_dir: str | Path) -> Path:
  run_dir = Path(run_dir)
  return (run_dir.parent if run_dir.name == "checkpoints" else run_dir) / "eval"


def sweep(
    run_dir: str | Path,
    benchmarks: Sequence[str],
    score: Callable,
    select_by: str | None = None,
    steps: Sequence[int] | None = None,
    log=print,
) -> dict:
  """Scores each step on each benchmark file and writes the table.

  `score(step, benchmark_path, out_dir)` evaluates one pair, writes its results into
  out_dir (evaluate.write_results) and returns the summary; it is called only for pairs
  with no summary on disk. Returns the table (see `build_table`).
  """
  names = [benchmark_name(b) for b in benchmarks]
  if len(set(names)) != len(names):
    raise ValueError(f"--data: benchmark file stems must differ, got {names}")
  select_by = select_by or names[0]
  if select_by not in names:
    raise ValueError(f"--select_by={select_by!r} is not one of the benchmarks {names}")
  out = eval_dir(run_dir)
  scores: dict[int, dict[str, float]] = {}
  for step in steps if steps is not None else kept_steps(run_dir):
    scores[step] = {}
    for path, name in zip(benchmarks, names):
      pair_dir = out / "steps" / str(step) / name
      if not (pair_dir / SUMMARY).is_file():
        log(f"step {step}: scoring {name}")
        score(step, path, pair_dir)
      else:
        log(f"step {step}: {name} already scored")
      scores[step][name] = float(json.loads((pair_dir / SUMMARY).read_text())["accuracy"])
  table = build_table(scores, names, select_by)
  write_table(out, table)
  return table


def build_table(scores: dict[int, dict[str, float]], names: Sequence[str], select_by: str) -> dict:
  rows = [
      {"step": step, "scores": {n: by_name[n] for n in names}, "average": sum(by_name[n] for n in names) / len(names)}
      for step, by_name in sorted(scores.items())
  ]
  if not rows:
    raise ValueError("no checkpoint steps to tabulate")
  best = max(rows, key=lambda r: (r["scores"][select_by], -r["step"]))  # earliest of equal scores
  return {"benchmarks": list(names), "select_by": select_by, "rows": rows, "best_step": best["step"]}


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def table_markdown(table: dict) -> str:
  names = table["benchmarks"]
  lines = ["| step | " + " | ".join(names) + " | average |", "|---" * (len(names) + 2) + "|"]
  for row in table["rows"]:
    mark = " (best)" if row["step"] == table["best_step"] else ""
    cells = [_pct(row["scores"][n]) for n in names] + [_pct(row["average"])]
    lines.append(f"| {row['step']}{mark} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"Best step by {table['select_by']}: {table['best_step']} (accuracy in %).")
  return "\n".join(lines) + "\n"


def write_table(out: Path, table: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
  (out / "table.md").write_text(table_markdown(table))


# ------------------------------------------------------------------------------ compare
def load_table(run_dir: str | Path) -> dict:
  path = eval_dir(run_dir) / "table.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} does not exist: score the run first with "
        f"scripts/eval.py --checkpoint={run_dir} --steps=all --task=math --data=..."
    )
  return json.loads(path.read_text())


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
  """The paper-style table (each run at its best step) and accuracy-vs-step plot."""
  tables = {Path(r).name if Path(r).name != "checkpoints" else Path(r).parent.name: load_table(r) for r in run_dirs}
  names: list[str] = []
  for table in tables.values():
    names += [n for n in table["benchmarks"] if n not in names]
  runs = []
  for run, table in tables.items():
    best = next(r for r in table["rows"] if r["step"] == table["best_step"])
    shown = {n: best["scores"].get(n) for n in names}
    present = [v for v in shown.values() if v is not None]
    runs.append(
        {
            "run": run,
            "best_step": table["best_step"],
            "select_by": table["select_by"],
            "scores": shown,
            "average": sum(present) / len(present),
        }
    )
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  result = {"benchmarks": names, "runs": runs}
  (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
  lines = ["| run | best step (by) | " + " | ".join(names) + " | average |", "|---" * (len(names) + 3) + "|"]
  for r in runs:
    cells = ["-" if r["scores"][n] is None else _pct(r["scores"][n]) for n in names] + [_pct(r["average"])]
    lines.append(f"| {r['run']} | {r['best_step']} ({r['select_by']}) | " + " | ".join(cells) + " |")
  (out / "compare.md").write_text("\n".join(lines) + "\n\nAccuracy in %, each run at its best step.\n")
  plot_accuracy_vs_step(tables, out / "accuracy_vs_step.png")
  return result


def plot_accuracy_vs_step(tables: dict[str, dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for run, table in tables.items():
    steps = [r["step"] for r in table["rows"]]
    ax.plot(
        steps,
        [100 * r["scores"][table["select_by"]] for r in table["rows"]],
        marker="o",
        label=f"{run} ({table['select_by']})",
    )
    ax.plot(steps, [100 * r["average"] for r in table["rows"]], linestyle="--", alpha=0.6, label=f"{run} (average)")
  ax.set_xlabel("step")
  ax.set_ylabel("accuracy (%)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
