"""Critique data from a student and a teacher, verdicts checked against the grader.

  python scripts/make_cft_data.py --problems=FILE.jsonl --student=CKPT --teacher=CKPT --samples=N \
      --out=FILE.jsonl [--max_new_tokens=1024] [--temperature=1.0] [--top_p=1.0] [--limit=K] \
      [--policy=all|agreeing|flawed_share] [--flawed_share=F] [--right_ratio=R] [--dedupe] \
      [--teacher_prompt=TEXT|@FILE]

Rows are WebInstruct-CFT ({instruction, input, output}) plus response_correct,
critique_verdict and critique_agrees: `prepare_data.py --format=auto` reads them. An
interrupted run resumes from OUT's ledger (<out stem>.samples.jsonl); rerunning a finished one
with another policy only re-selects. The summary goes to <out stem>.summary.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import flags

from cftjax import cft_data, cli

flags.DEFINE_string("problems", None, "Math problems (JSONL/JSON in any shape eval --task=math reads).", required=True)
flags.DEFINE_string(
    "student", None, "Checkpoint that samples the responses (run dir or imported model).", required=True
)
flags.DEFINE_string("teacher", None, "Checkpoint that critiques them (may be the student).", required=True)
flags.DEFINE_integer("samples", None, "Responses sampled per problem.", required=True)
flags.DEFINE_string("out", None, "Output JSONL.", required=True)
flags.DEFINE_integer("max_new_tokens", 1024, "Longest student response.")
flags.DEFINE_integer("teacher_max_new_tokens", None, "Longest critique; default --max_new_tokens.")
flags.DEFINE_float("temperature", 1.0, "Student sampling temperature (0 = greedy: N equal samples).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (student and teacher).")
flags.DEFINE_float("teacher_temperature", 0.0, "Teacher temperature; 0 = greedy.")
flags.DEFINE_integer("limit", None, "Only the first K problems.")
flags.DEFINE_enum(
    "policy",
    "all",
    list(cft_data.POLICIES),
    "all | agreeing (drop critiques whose verdict contradicts the grader) | "
    "flawed_share (agreeing ones plus --flawed_share of contradicting ones).",
)
flags.DEFINE_float("flawed_share", 0.0, "Share of flawed critiques among kept rows (policy flawed_share).")
flags.DEFINE_float("right_ratio", None, "Share of right responses among kept rows (majority side subsampled).")
flags.DEFINE_bool("dedupe", False, "Drop responses that repeat an earlier one of the same problem.")
flags.DEFINE_string(
    "teacher_prompt",
    None,
    "Teacher user turn with {question}, {response} [, {reference}], or "
    "@FILE; default the CFT paper's critique prompt.",
)
flags.DEFINE_integer("seed", 0, "Sampling and subsampling seed.")
flags.DEFINE_integer("batch_size", 32, "Prompts per generation batch.")


def main(argv):
  del argv
  cli.make_cft_data_main(flags.FLAGS)


if __name__ == "__main__":
  cli.run(main)
