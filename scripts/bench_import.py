"""Benchmark: import time and peak host memory (RSS) for a ~1B-parameter HF checkpoint.

  python scripts/bench_import.py --workdir=/tmp/cftjax_bench [--param_dtype=bfloat16] [--to_checkpoint]

Generates (once) a random Llama-3.2-1B-shaped model in the Hugging Face format (bf16
safetensors split into ~1 GB shards with an index; no torch needed), then imports it in a
fresh child process and reports wall time and that process's peak RSS against the
checkpoint size. --to_checkpoint also writes the Orbax checkpoint (what
`convert.py import` does). On a CPU backend the imported parameters themselves live in
host memory, so with param_dtype=bfloat16 they alone are 1x the checkpoint size; on an
accelerator they live in device memory. Delete the workdir afterwards (~2.5 GB, more with
--to_checkpoint).
"""

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `configs.base`

from absl import flags

from cftjax import cli

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/cftjax_bench", "Where the random model (and checkpoint) go.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "bfloat16", ["bfloat16", "float32"], "model.param_dtype to import into."
)
_TO_CHECKPOINT = flags.DEFINE_bool("to_checkpoint", False, "Also write the Orbax checkpoint (convert.py import).")
_MEASURE = flags.DEFINE_bool("measure", False, "Internal: run the import in this process and print JSON.")

# Llama 3.2 1B: 1.24e9 parameters with tied embeddings.
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
SHARD_BYTES = 10**9


def hf_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update(
        {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    )
  shapes["model.norm.weight"] = (d,)
  return shapes


def generate(hf_dir: Path) -> None:
  """Random bf16 weights written one tensor at a time: random bit patterns with magnitudes
  in [2^-15, 2^-5) and random signs, incompressible like real weights and fast to draw."""
  import ml_dtypes
  import numpy as np

  from cftjax import hf

  hf_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  shapes = hf_tensor_shapes(HF_CONFIG)
  files: list[list[str]] = [[]]
  size = 0
  for name, shape in shapes.items():
    nbytes = math.prod(shape) * 2
    if files[-1] and size + nbytes > SHARD_BYTES:
      files.append([])
      size = 0
    files[-1].append(name)
    size += nbytes

  def produce(name: str):
    n = math.prod(shapes[name])
    bits = rng.integers(0x3800, 0x3D00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    return bits.view(ml_dtypes.bfloat16).reshape(shapes[name])

  weight_map = {}
  for i, names in enumerate(files, 1):
    file_name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
    hf.write_safetensors(hf_dir / file_name, [(n, shapes[n], ml_dtypes.bfloat16) for n in names], produce)
    weight_map.update({n: file_name for n in names})
  index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())}, "weight_map": weight_map}
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
  (hf_dir / "config.json").write_text(json.dumps(HF_CONFIG))


def peak_rss_bytes() -> int:
  """This process's peak RSS. VmHWM (Linux) restarts at exec; ru_maxrss may carry the
  parent's peak into a child, so it is only the fallback."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(hf_dir: Path, out_dir: Path, param_dtype: str, to_checkpoint: bool) -> dict:
  start_rss = peak_rss_bytes()
  import jax
  import ml_collections

  from cftjax import hf, sharding
  from cftjax.model import ModelConfig
  from configs import base

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
  config = base.get_config()
  config.model.param_dtype = param_dtype
  config.model.update(hf.hf_model_config(hf_dir))
  jax.block_until_ready(jax.numpy.zeros(1))
  before_rss = peak_rss_bytes()
  t0 = time.perf_counter()
  if to_checkpoint:
    hf.import_to_checkpoint(hf_dir, out_dir, mesh, config)
  else:
    params = hf.import_params(hf_dir, ModelConfig.from_config(config.model), mesh)
    jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  peak_rss = peak_rss_bytes()
  checkpoint_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
  num_params = ModelConfig.from_config(config.model).num_params()
  return {
      "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
      "param_dtype": param_dtype,
      "to_checkpoint": to_checkpoint,
      "num_params": num_params,
      "checkpoint_gb": checkpoint_bytes / 1e9,
      "seconds": seconds,
      "peak_rss_gb": peak_rss / 1e9,
      "rss_before_import_gb": before_rss / 1e9,
      "interpreter_rss_gb": start_rss / 1e9,
      "peak_rss_over_checkpoint": peak_rss / checkpoint_bytes,
  }


def main(argv):
  del argv
  workdir = Path(_WORKDIR.value)
  hf_dir, out_dir = workdir / "hf_1b", workdir / f"ckpt_{_PARAM_DTYPE.value}"
  if _MEASURE.value:
    print(json.dumps(measure(hf_dir, out_dir, _PARAM_DTYPE.value, _TO_CHECKPOINT.value)))
    return
  if not (hf_dir / "config.json").is_file():
    t0 = time.perf_counter()
    generate(hf_dir)
    print(f"generated {hf_dir} in {time.perf_counter() - t0:.0f}s")
  if _TO_CHECKPOINT.value and out_dir.exists():
    raise cli.UserError(f"{out_dir} exists; delete it first")
  child = subprocess.run(
      [
          sys.executable,
          __file__,
          f"--workdir={workdir}",
          f"--param_dtype={_PARAM_DTYPE.value}",
          f"--to_checkpoint={_TO_CHECKPOINT.value}",
          "--measure",
      ],
      check=True,
      capture_output=True,
      text=True,
  )
  r = json.loads(child.stdout.strip().splitlines()[-1])
  print(
      f"{r['num_params'] / 1e9:.2f}B params, checkpoint {r['checkpoint_gb']:.2f} GB (bf16), {r['devices']}, "
      f"param_dtype={r['param_dtype']}, to_checkpoint={r['to_checkpoint']}"
  )
  print(
      f"import: {r['seconds']:.1f} s; peak RSS {r['peak_rss_gb']:.2f} GB = "
      f"{r['peak_rss_over_checkpoint']:.2f} x checkpoint (RSS before import {r['rss_before_import_gb']:.2f} GB)"
  )


if __name__ == "__main__":
  cli.run(main)
