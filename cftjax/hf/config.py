"""Hugging Face config.json <-> our model config, both directions side by side:
`hf_model_config` (import) and its inverse `hf_config_dict` (export)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ml_collections

from cftjax.data.records import read_json_object
from cftjax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE
from cftjax.model import ModelConfig

log = logging.getLogger(__name__)

# architecture -> family (config.model.family); family -> (architecture, model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
FAMILY_TO_HF = {family: (arch, family) for arch, family in ARCHITECTURES.items()}


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: expected a Hugging Face model directory with config.json and "
        f"{SINGLE_FILE} (or {INDEX_FILE})"
    )
  return read_json_object(path)


def hf_family(hf_config: dict, where: str = "config.json") -> str:
  architectures = hf_config.get("architectures") or []
  known = [a for a in architectures if a in ARCHITECTURES]
  if known:
    return ARCHITECTURES[known[0]]
  if not architectures and hf_config.get("model_type") in FAMILY_TO_HF:
    return hf_config["model_type"]
  raise ValueError(
      f"{where}: unsupported architecture {architectures or hf_config.get('model_type')!r}; "
      f"supported: {sorted(ARCHITECTURES)}"
  )


def _rope_fields(hf_config: dict, where: str) -> dict:
  """rope_theta and Llama 3.1 scaling, from transformers 4 keys (rope_theta, rope_scaling)
  or transformers 5 keys (rope_parameters)."""
  params = hf_config.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    theta, scaling = params["rope_theta"], params
  else:
    theta, scaling = hf_config.get("rope_theta", 10000.0), hf_config.get("rope_scaling")
  fields: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling_type": ""}
  if not scaling:
    return fields
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return fields
  if rope_type != "llama3":
    raise ValueError(
        f"{where}: rope scaling type {rope_type!r} is not supported (only 'llama3', as in " f"Llama 3.1, or none)"
    )
  try:
    fields.update(
        rope_scaling_type="llama3",
        rope_scaling_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_position=int(scaling["original_max_position_embeddings"]),
    )
  except KeyError as e:
    raise ValueError(f"{where}: llama3 rope scaling lacks field {e.args[0]!r}") from e
  return fields


def _unsupported_sliding_window(hf_config: dict, family: str) -> int | None:
  window = hf_config.get("sliding_window")
  if family == "qwen2" and hf_config.get("use_sliding_window"):
    return int(window) if window else None
  return None


def hf_model_config(hf_dir: str | os.PathLike, max_length: int | None = None, warn: bool = True) -> dict:
  """config.json -> overrides for `config.model` (keys are `config.model` field names).

  `max_length` (the training/eval sequence length) is checked against Qwen2's sliding
  window: above it our full attention would differ from the model's, so that is an error.
  """
  hf_config = read_hf_config(hf_dir)
  where = str(Path(hf_dir) / "config.json")
  family = hf_family(hf_config, where)

  def field(key: str, default: Any = None) -> Any:
    value = hf_config.get(key)
    if value is None:
      if default is None:
        raise ValueError(f"{where}: missing field {key!r}")
      return default
    return value

  if field("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={hf_config['hidden_act']!r} is not supported (only 'silu')")
  for flag in ("attention_bias", "mlp_bias"):
    if hf_config.get(flag):
      raise ValueError(f"{where}: {flag}=true is not supported (only Qwen2's q/k/v biases are)")
  hidden_size = int(field("hidden_size"))
  num_heads = int(field("num_attention_heads"))
  head_dim = hf_config.get("head_dim")
  if head_dim is None:
    if hidden_size % num_heads:
      raise ValueError(f"{where}: hidden_size={hidden_size} is not a multiple of num_attention_heads={num_heads}")
    head_dim = hidden_size // num_heads

  window = _unsupported_sliding_window(hf_config, family)
  if window is not None:
    if max_length is not None and max_length > window:
      raise ValueError(
          f"{where}: sliding_window={window} is not supported and max length {max_length} "
          f"exceeds it (cftjax attends to all earlier tokens); use a max length <= {window}"
      )
    if warn:
      log.warning(
          "%s: sliding_window=%d is not implemented (cftjax attends to all earlier tokens); "
          "results match the original model only for sequences up to %d tokens",
          where,
          window,
          window,
      )

  overrides = {
      "family": family,
      "vocab_size": int(field("vocab_size")),
      "hidden_size": hidden_size,
      "num_layers": int(field("num_hidden_layers")),
      "num_heads": num_heads,
      "num_kv_heads": int(field("num_key_value_heads", num_heads)),
      "head_dim": int(head_dim),
      "intermediate_size": int(field("intermediate_size")),
      "rms_norm_eps": float(field("rms_norm_eps", 1e-6)),
      "initializer_range": float(field("initializer_range", 0.02)),
      # All three families default to untied embeddings in transformers.
      "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
      "qkv_bias": family == "qwen2",
      "sliding_window": int(hf_config.get("sliding_window") or 0) if family == "mistral" else 0,
  }
  overrides.update(_rope_fields(hf_config, where))
  return overrides


def hf_config_dict(model_config: ModelConfig, family: str, torch_dtype: str, base: dict | None = None) -> dict:
  """config.json for transformers; fields we do not model (token ids, max positions,
  Qwen2 sliding-window fields) come from `base`, the original model's config.json, when given."""
  architecture, model_type = FAMILY_TO_HF[family]
  out = dict(base or {}) if (base or {}).get("model_type") == model_type else {}
  for stale in ("rope_parameters", "rope_scaling", "dtype", "transformers_version", "_name_or_path"):
    out.pop(stale, None)
  rope_scaling = None
  if model_config.rope_scaling_type == "llama3":
    rope_scaling = {
        "rope_type": "llama3",
        "factor": model_config.rope_scaling_factor,
        "low_freq_factor": model_config.rope_low_freq_factor,
        "high_freq_factor": model_config.rope_high_freq_factor,
        "original_max_position_embeddings": model_config.rope_original_max_position,
    }
  out.setdefault(
      "max_position_embeddings",
      4096 if rope_scaling is None else int(model_config.rope_original_max_position * model_config.rope_scaling_factor),
  )
  out.setdefault("attention_dropout", 0.0)
  out.setdefault("use_cache", True)
  out.update(
      architectures=[architecture],
      model_type=model_type,
      vocab_size=model_config.vocab_size,
      hidden_size=model_config.hidden_size,
      intermediate_size=model_config.intermediate_size,
      num_hidden_layers=model_config.num_layers,
      num_attention_heads=model_config.num_heads,
      num_key_value_heads=model_config.num_kv_heads,
      head_dim=model_config.head_dim,
      hidden_act="silu",
      rms_norm_eps=model_config.rms_norm_eps,
      initializer_range=model_config.initializer_range,
      rope_theta=model_config.rope_theta,
      rope_scaling=rope_scaling,
      tie_word_embeddings=model_config.tie_embeddings,
      torch_dtype=torch_dtype,
  )
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if family == "mistral":
    out["sliding_window"] = model_config.sliding_window or None
  if family == "qwen2":
    out.setdefault("use_sliding_window", False)
    out.setdefault("sliding_window", None)
    out.setdefault("max_window_layers", model_config.num_layers)
    if "layer_types" in out and len(out["layer_types"]) != model_config.num_layers:
      out.pop("layer_types")
  return out


# How weights start, not what loaded weights compute: a checkpoint may differ here.
_INIT_ONLY_FIELDS = frozenset({"initializer_range"})


def check_model_config(model_config: ModelConfig, overrides: dict, where: str) -> None:
  """Every architecture field of `model_config` must equal what config.json says."""
  mismatches = [
      f"model.{key}={getattr(model_config, key)!r} but {where} says {value!r}"
      for key, value in overrides.items()
      if key not in _INIT_ONLY_FIELDS and hasattr(model_config, key) and getattr(model_config, key) != value
  ]
  if mismatches:
    raise ValueError("model config does not match the checkpoint: " + "; ".join(mismatches))


def model_config_family(config: ml_collections.ConfigDict) -> str:
  family = config.model.get("family", "llama")
  if family not in FAMILY_TO_HF:
    raise ValueError(f"config key model.family={family!r} is not one of {sorted(FAMILY_TO_HF)}")
  return family
