"""Turn local JSON/JSONL files into a TFDS ArrayRecord dataset of canonical records.

  python scripts/prepare_data.py --input=train.jsonl[,more.jsonl] --name=my_cft --data_dir=data \
      [--format=auto|webinstruct_cft|messages|triples|sft] [--skip_invalid] \
      [--validation_fraction=0.01 | --validation_input=val.jsonl[,...]] [--overwrite]

Without --validation_input, about --validation_fraction of the distinct queries
(default 0.01) go to the "validation" split by a stable hash; with it, those files are
the validation split. A bad row stops the run with "error: file:line: reason" (exit 2) unless
--skip_invalid, which skips bad rows and reports counts per reason and the first lines.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cftjax

from absl import flags

from cftjax import cli
from cftjax.data import records, tfds_builder

_INPUT = flags.DEFINE_list(
    "input",
    None,
    "Comma-separated .jsonl/.json files (the train split, or all rows " "when splitting by hash).",
    required=True,
)
_VALIDATION_INPUT = flags.DEFINE_list(
    "validation_input", [], "Comma-separated files for the validation split; " "exclusive with --validation_fraction."
)
_FORMAT = flags.DEFINE_enum("format", records.AUTO, (records.AUTO,) + records.FORMATS, "Row format.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (lower snake_case).", required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory; the dataset goes to DATA_DIR/NAME/1.0.0.", required=True
)
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False, "Skip bad rows (and report them) instead of failing.")
_VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction",
    None,
    f"Share of distinct queries for validation (default {tfds_builder.DEFAULT_VALIDATION_FRACTION}).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name and version.")


def summary_lines(result: tfds_builder.BuildResult) -> list[str]:
  lines = [f"format: {result.format} ({result.format_note})"]
  lines += [f"{split}: {count} examples" for split, count in result.counts.items()]
  lines.append(f"skipped: {result.skipped.total} rows")
  lines += [f"  {line}" for line in result.skipped.summary_lines()]
  lines.append(f"wrote {result.dataset_dir} in {result.seconds:.1f}s")
  return lines


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger(tfds_builder.__name__).setLevel(logging.INFO)
  try:
    result = tfds_builder.build_dataset(
        inputs=_INPUT.value,
        format=_FORMAT.value,
        name=_NAME.value,
        data_dir=_DATA_DIR.value,
        validation_fraction=_VALIDATION_FRACTION.value,
        skip_invalid=_SKIP_INVALID.value,
        validation_inputs=_VALIDATION_INPUT.value,
        overwrite=_OVERWRITE.value,
    )
  except records.InvalidRow as e:
    raise cli.UserError(f"{e} (pass --skip_invalid to skip and count bad rows)") from e
  print("\n".join(summary_lines(result)))
  return 0


if __name__ == "__main__":
  cli.run(main)
