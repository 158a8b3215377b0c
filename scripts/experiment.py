"""The embedded experiment: python scripts/experiment.py [--config=configs/experiment.py] [--workdir=runs/experiment]

Base model -> SFT / CFT (flawed-critique fractions) / mix arms -> direct-answer, critique and
self-critique accuracy on held-out problems; results.md / results.json and plots in the
workdir. A rerun skips finished stages."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ imports `configs.demo`

from absl import flags

from cftjax import cli

_CONFIG = cli.define_config_file("config", "configs/experiment.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory; default runs/<config file stem>.")


def main(argv):
  del argv
  cli.experiment_main(_CONFIG.value, _WORKDIR.value, flags.FLAGS["config"].config_filename)


if __name__ == "__main__":
  cli.run(main)
