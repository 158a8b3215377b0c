"""Hugging Face <-> cftjax checkpoints.

  python scripts/convert.py import --hf_dir=/path/to/Qwen2.5-Math-7B --out=models/qwen2_5_math_7b \
      [--param_dtype=float32|bfloat16] [--max_length=2048] [--noscan_layers]
  python scripts/convert.py export --checkpoint=runs/NAME --out=exported/NAME \
      [--dtype=bfloat16|float16|float32] [--max_shard_size=5GB] [--step=N]

import writes an Orbax parameter checkpoint (step 0) plus OUT/tokenizer/ and OUT/hf_config.json;
export writes config.json, safetensors (sharded with an index above --max_shard_size) and the
tokenizer files, loadable with transformers.AutoModelForCausalLM.from_pretrained(OUT).
Parameters are sharded over every local device (mesh fsdp=-1) while converting.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `configs.base`

from absl import flags
from absl import logging as absl_logging

from cftjax import cli

_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: Hugging Face model directory (config.json + safetensors).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "export: cftjax checkpoint directory or training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).", required=True)
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "float32", ["float32", "bfloat16"], "import: dtype of the stored parameters (model.param_dtype)."
)
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", True, "import: stack layers on a leading axis (model.scan_layers).")
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 2048, "import: sequence length you will train with " "(checked against a sliding attention window)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["bfloat16", "float16", "float32"],
    "export: weight dtype; default the original model's torch_dtype, else param_dtype.",
)
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "export: largest safetensors file, e.g. 5GB, 500MB.")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the newest).")

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}


def parse_size(text: str) -> int:
  upper = text.strip().upper()
  for unit, factor in _UNITS.items():
    if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
      return int(float(upper[: -len(unit)]) * factor)
  if upper.isdigit():
    return int(upper)
  raise cli.UserError(f"--max_shard_size={text!r} is not a size such as 5GB, 500MB or 1000000")


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    raise cli.UserError("usage: convert.py import --hf_dir=DIR --out=DIR | export --checkpoint=DIR --out=DIR")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and JAX are chatty at INFO
  logging.getLogger("cftjax.hf").setLevel(logging.INFO)  # per-tensor progress
  import ml_collections

  from cftjax import chat_templates, hf, sharding
  from configs import base

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
  if argv[1] == "import":
    if not _HF_DIR.value:
      raise cli.UserError("import needs --hf_dir=DIR")
    config = base.get_config()
    config.model.param_dtype = _PARAM_DTYPE.value
    config.model.scan_layers = _SCAN_LAYERS.value
    config.data.max_length = _MAX_LENGTH.value
    saved = hf.import_to_checkpoint(_HF_DIR.value, _OUT.value, mesh, config)
    print(
        f"imported {saved.model.family} ({saved.model.num_layers} layers) into {_OUT.value}; "
        f"tokenizer in {saved.data.tokenizer}; "
        f"{chat_templates.describe(saved.data.chat_template, saved.data.tokenizer)}"
    )
  else:
    if not _CHECKPOINT.value:
      raise cli.UserError("export needs --checkpoint=DIR")
    out = hf.export_checkpoint(
        _CHECKPOINT.value,
        _OUT.value,
        mesh,
        dtype=_DTYPE.value,
        max_shard_bytes=parse_size(_MAX_SHARD_SIZE.value),
        step=_STEP.value,
    )
    print(f"exported {_CHECKPOINT.value} to {out}")
  return 0


if __name__ == "__main__":
  cli.run(main)
