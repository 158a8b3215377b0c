"""Evaluate a checkpoint: python scripts/eval.py --checkpoint=DIR --task=demo|math|critique [--data=FILE.jsonl] [--out=DIR]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import flags

from cftjax import cli

flags.DEFINE_string("checkpoint", None, "A run directory, its checkpoints/ dir, or an imported model.", required=True)
flags.DEFINE_enum("task", "demo", ["demo", "math", "critique"], "What to evaluate.")
flags.DEFINE_string("data", None, "JSONL benchmark file (math, critique).")
flags.DEFINE_string("out", None, "Output directory; default <checkpoint>/eval/<task>.")
flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
flags.DEFINE_integer("batch_size", 32, "Prompts per generation batch.")
flags.DEFINE_integer("max_new_tokens", None, "Default: 384 for demo, 2048 otherwise.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  cli.eval_main(flags.FLAGS)


if __name__ == "__main__":
  cli.run(main)
