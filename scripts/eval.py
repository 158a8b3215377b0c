"""Evaluate a checkpoint: python scripts/eval.py --checkpoint=DIR --task=demo|math|critique [--data=FILE.jsonl] [--out=DIR]

Every kept step on several benchmarks, with the best step named:
  python scripts/eval.py --checkpoint=RUN_DIR --steps=all --task=math --data=math500.jsonl,gsm8k.jsonl
A 7B model sharded over 8 chips in bfloat16: --mesh.fsdp=8 --dtype=bfloat16."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import flags

from cftjax import cli

flags.DEFINE_string("checkpoint", None, "A run directory, its checkpoints/ dir, or an imported model.", required=True)
flags.DEFINE_enum("task", "demo", ["demo", "math", "critique"], "What to evaluate.")
flags.DEFINE_string("data", None, "JSONL benchmark file(s) (math, critique); several, comma-separated, with --steps.")
flags.DEFINE_string("out", None, "Output directory; default <checkpoint>/eval/<task>.")
flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
flags.DEFINE_integer("batch_size", 32, "Prompts per generation batch.")
flags.DEFINE_integer("max_new_tokens", None, "Default: 384 for demo, 2048 otherwise.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string(
    "steps",
    None,
    "'all' or comma-separated steps: score each on every --data file into "
    "<run>/eval/table.md|json (finished pairs are kept).",
)
flags.DEFINE_string("select_by", None, "Benchmark (file stem) that picks the best step; default the first --data file.")
flags.DEFINE_integer("num_samples", 1, "Answers per problem (math): pass@k and majority vote; needs --temperature > 0.")
flags.DEFINE_string("dtype", "", "Inference dtype for weights and compute, e.g. bfloat16; default the run's.")
flags.DEFINE_integer("mesh.fsdp", 1, "Devices the weights are sharded over (fsdp); the rest split rows.")
flags.DEFINE_integer("mesh.tensor", 1, "Devices heads / MLP / vocab are split over.")


def main(argv):
  del argv
  cli.eval_main(flags.FLAGS)


if __name__ == "__main__":
  cli.run(main)
