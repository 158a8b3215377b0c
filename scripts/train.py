"""Train or resume: python scripts/train.py [--config=configs/demo.py] [--workdir=runs/NAME] [--config.a.b=v]

--dry_run compiles the train step for the configured mesh without running it and prints
the memory it needs per device (simulate a slice on CPU with
XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ imports `configs.base`

from absl import flags

from cftjax import cli

_CONFIG = cli.define_config_file("config", "configs/demo.py", "Config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config file stem>.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile ahead of time and print per-device memory; train nothing.")
_DEVICE_GIB = flags.DEFINE_float(
    "device_memory_gib",
    None,
    "With --dry_run: check against this much memory per device " "(default: the device's own, when it reports it).",
)


def main(argv):
  del argv
  if _DRY_RUN.value:
    cli.dry_run_main(_CONFIG.value, _DEVICE_GIB.value)
  else:
    cli.train_main(_CONFIG.value, _WORKDIR.value, flags.FLAGS["config"].config_filename)


if __name__ == "__main__":
  cli.run(main)
