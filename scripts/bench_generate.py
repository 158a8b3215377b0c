"""Benchmark: prefill and decode throughput of cftjax.generate against transformers.

  python scripts/bench_generate.py [--models=demo,100m] [--batch_sizes=1,16]
      [--prompt_length=64] [--new_tokens=64] [--repeats=3] [--noscan_layers] [--out=FILE.json]

For each model a random Llama is built with transformers (float32), saved, imported with
cftjax.hf.import_params, and both sides run greedy generation on the same random prompts
(all of --prompt_length tokens, so neither side pads) on this machine's CPU:

  prefill tokens/s = batch * prompt_length / time(generate 1 token)
  decode tokens/s  = batch * (new_tokens - 1) / (time(generate new_tokens) - time(generate 1))

Times are medians over --repeats runs after one warm-up run (our compilation excluded);
our runs and transformers' runs interleave, so a busy machine slows both alike.
"ratio" is ours / transformers; "same tokens" is the share of rows whose greedy tokens
agree exactly (random models have near-ties, so an occasional divergence late in a row is
float rounding, not a bug; the tests check exact agreement on a small model).
"""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cftjax import cli  # noqa: E402
from cftjax import generate as gen  # noqa: E402
from cftjax import hf, host_memory, sharding  # noqa: E402
from cftjax.model import ModelConfig, Transformer  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["demo", "100m"], "Model sizes to run: demo, 100m.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to run.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 64, "Tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt (no EOS).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers",
    True,
    "Our model.scan_layers at import. generate() decodes with layers unrolled either way "
    "(cftjax.generate.unrolled_layers), so this changes only how the params are held.",
)
_KEEP_STEP_MEMORY = flags.DEFINE_bool(
    "keep_step_memory",
    True,
    "Keep freed step memory for the next call, as scripts/eval.py does (cftjax.host_memory; "
    "malloc's settings are the process's, so torch's side gets them too).",
)
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the results.")

# Architectures (Llama layout, untied head, grouped-query attention).
MODELS = {
    "demo": dict(
        vocab_size=512,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
    ),
    "100m": dict(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
    ),
}


def build_models(name: str, workdir: Path):
  """(transformers model, our Transformer, our params) with identical random weights."""
  import torch
  import transformers

  hf_config = transformers.LlamaConfig(
      **MODELS[name],
      max_position_embeddings=4096,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      tie_word_embeddings=False,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=0,
  )
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(hf_config).eval()
  hf_dir = workdir / name
  hf_model.save_pretrained(hf_dir)
  config = ModelConfig.from_config({**hf.hf_model_config(hf_dir, warn=False), "scan_layers": _SCAN_LAYERS.value})
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  params = hf.import_params(hf_dir, config, mesh)
  return hf_model, Transformer(config), params


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def timed_medians(runs: dict, repeats: int) -> dict:
  """Median seconds per named run; runs interleave so load changes hit all of them alike."""
  for fn in runs.values():
    fn()  # warm-up: compilation, caches
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      times[name].append(seconds(fn))
  return {name: statistics.median(t) for name, t in times.items()}


def ours_runner(model, params, prompts):
  def run(n):
    sampling = gen.SamplingConfig(max_new_tokens=n)
    return gen.generate(model, params, prompts, sampling, batch_size=len(prompts), progress=False)

  return run


def hf_runner(hf_model, prompts):
  import torch

  ids = torch.tensor(prompts)

  def run(n):
    with torch.no_grad():
      out = hf_model.generate(
          ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
      )
    return out[:, ids.shape[1] :].tolist()

  return run


def throughput(batch, prompt_length, new_tokens, t_prefill, t_full):
  """(prefill, decode) tokens/s; decode is nan when noise made the longer run not longer."""
  decode_seconds = t_full - t_prefill
  decode = batch * (new_tokens - 1) / decode_seconds if decode_seconds > 0 else float("nan")
  return batch * prompt_length / t_prefill, decode


def main(argv):
  del argv
  import torch

  if _KEEP_STEP_MEMORY.value:
    host_memory.keep_step_memory()
  p_len, n_new, repeats = _PROMPT_LENGTH.value, _NEW_TOKENS.value, _REPEATS.value
  results = []
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} "
      f"with {torch.get_num_threads()} threads; prompt {p_len} tokens, {n_new} new tokens; "
      f"scan_layers={_SCAN_LAYERS.value}; keep_step_memory={_KEEP_STEP_MEMORY.value}; load average {os.getloadavg()[0]:.1f}"
  )
  header = (
      f"{'model':>6} {'params':>7} {'batch':>5} | {'prefill tok/s':>13} {'hf':>9} {'ratio':>6} | "
      f"{'decode tok/s':>12} {'hf':>9} {'ratio':>6} | same tokens"
  )
  print(header)
  with tempfile.TemporaryDirectory() as workdir:
    for name in _MODELS.value:
      if name not in MODELS:
        raise ValueError(f"--models: unknown model {name!r}; choose from {sorted(MODELS)}")
      hf_model, model, params = build_models(name, Path(workdir))
      for batch in (int(b) for b in _BATCH_SIZES.value):
        rng = np.random.default_rng(batch)
        prompts = rng.integers(1, model.config.vocab_size, (batch, p_len)).tolist()
        ours, theirs = ours_runner(model, params, prompts), hf_runner(hf_model, prompts)
        t = timed_medians(
            {
                "ours_1": lambda: ours(1),
                "hf_1": lambda: theirs(1),
                "ours_n": lambda: ours(n_new),
                "hf_n": lambda: theirs(n_new),
            },
            repeats,
        )
        ours_prefill, ours_decode = throughput(batch, p_len, n_new, t["ours_1"], t["ours_n"])
        hf_prefill, hf_decode = throughput(batch, p_len, n_new, t["hf_1"], t["hf_n"])
        ours_tokens, hf_tokens = ours(n_new), theirs(n_new)
        same = sum(a == b for a, b in zip(ours_tokens, hf_tokens)) / batch
        row = dict(
            model=name,
            scan_layers=model.config.scan_layers,
            params=model.config.num_params(),
            batch=batch,
            prompt_length=p_len,
            new_tokens=n_new,
            prefill_tokens_per_s=ours_prefill,
            hf_prefill_tokens_per_s=hf_prefill,
            decode_tokens_per_s=ours_decode,
            hf_decode_tokens_per_s=hf_decode,
            same_tokens=same,
        )
        results.append(row)
        print(
            f"{name:>6} {row['params'] / 1e6:6.1f}M {batch:>5} | {ours_prefill:13.0f} {hf_prefill:9.0f} "
            f"{ours_prefill / hf_prefill:6.2f} | {ours_decode:12.0f} {hf_decode:9.0f} "
            f"{ours_decode / hf_decode:6.2f} | {same:.2f}",
            flush=True,
        )
  if _OUT.value:
    Path(_OUT.value).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  cli.run(main)
