"""Side by side: python scripts/compare.py RUN_A RUN_B [...] [--out=DIR]

Each run at its best step (from its eval/table.json, written by scripts/eval.py --steps=all),
on every benchmark, with the average; plus accuracy against step per run (PNG)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags

from cftjax import cli

flags.DEFINE_string("out", "compare", "Output directory for compare.md, compare.json, accuracy_vs_step.png.")


def main(argv):
  if len(argv) < 2:
    sys.exit("usage: python scripts/compare.py RUN_A RUN_B [...] [--out=DIR]")
  cli.compare_main(argv[1:], flags.FLAGS.out)


if __name__ == "__main__":
  app.run(main)
