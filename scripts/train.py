"""Train or resume: python scripts/train.py [--config=configs/demo.py] [--workdir=runs/NAME] [--config.a.b=v]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ imports `configs.base`

from absl import flags

from cftjax import cli

_CONFIG = cli.define_config_file("config", "configs/demo.py", "Config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config file stem>.")


def main(argv):
  del argv
  cli.train_main(_CONFIG.value, _WORKDIR.value, flags.FLAGS["config"].config_filename)


if __name__ == "__main__":
  cli.run(main)
