"""Hugging Face import/export parity against transformers on tiny random models (CPU torch)."""

import dataclasses
import functools
import itertools
import json
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cftjax import chat_templates, checkpoint, hf, sharding  # noqa: E402
from cftjax.model import ModelConfig, Transformer  # noqa: E402

VOCAB, LENGTH = 96, 24
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: most frequencies get rescaled at these short positions.
    "original_max_position_embeddings": 16,
}


def _hf_model(family: str, seed: int = 0, **overrides):
  """A tiny random transformers model; weights far from init so every tensor matters."""
  if family == "llama":  # grouped-query attention: 4 query heads over 2 kv heads
    config = transformers.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, **overrides)
    model_class = transformers.LlamaForCausalLM
  elif family == "qwen2":  # q/k/v biases, tied embeddings
    config = transformers.Qwen2Config(
        **TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **overrides
    )
    model_class = transformers.Qwen2ForCausalLM
  else:  # mistral, multi-head attention, explicit head_dim
    config = transformers.MistralConfig(
        **TINY, num_attention_heads=4, num_key_value_heads=4, head_dim=16, **{"sliding_window": None, **overrides}
    )
    model_class = transformers.MistralForCausalLM
  torch.manual_seed(seed)
  model = model_class(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
  return model


def _tokens(seed: int = 0, batch: int = 2) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, LENGTH)).astype(np.int32)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _model_config(hf_dir, **overrides) -> ModelConfig:
  values = hf.hf_model_config(hf_dir)
  values.update(overrides)
  return ModelConfig.from_config(values)


@functools.lru_cache(maxsize=None)
def _forward(model_config: ModelConfig):
  """One jitted forward per model config: tests sharing a config share the compilation."""
  return jax.jit(lambda p, t, pos, seg: Transformer(model_config).apply({"params": p}, t, pos, seg)[0])


def _our_logits(params, model_config: ModelConfig, tokens: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(_forward(model_config)(params, tokens, positions, np.ones_like(tokens)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _mesh(fsdp: int = 1, tensor: int = 1, required: bool = True):
  """fsdp x tensor mesh; without enough devices skip, or (required=False) use one device."""
  if len(jax.devices()) < fsdp * tensor:
    if required:
      pytest.skip(f"needs {fsdp * tensor} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    fsdp = tensor = 1
  devices = jax.devices()[: fsdp * tensor]
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=fsdp, tensor=tensor)), devices)


def _base_config() -> ml_collections.ConfigDict:
  from configs import base  # importable through tests/conftest.py

  return base.get_config()


# ------------------------------------------------------------------------------ import parity
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_import_matches_transformers_logits_in_float32(family, tmp_path):
  model = _hf_model(family)
  model.save_pretrained(tmp_path)
  model_config = _model_config(tmp_path)
  assert model_config.qkv_bias == (family == "qwen2")
  assert model_config.tie_embeddings == (family == "qwen2")
  params = hf.import_params(tmp_path, model_config, _mesh())
  tokens = _tokens()
  np.testing.assert_allclose(_our_logits(params, model_config, tokens), _torch_logits(model, tokens), atol=1e-4, rtol=0)


def test_bf16_checkpoint_and_bf16_compute(tmp_path):
  """A bf16 checkpoint loads exactly into float32 params; bf16 compute stays within KL 1e-3."""
  _hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
  # The reference: the same bf16 weights, computed in float32 (a fresh load, since
  # .to(bfloat16) also rounds the rotary frequency buffer).
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  tokens = _tokens()
  reference = _torch_logits(model, tokens)

  float32_config = _model_config(tmp_path)
  params = hf.import_params(tmp_path, float32_config, _mesh())
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
  np.testing.assert_allclose(_our_logits(params, float32_config, tokens), reference, atol=1e-4, rtol=0)

  bf16_config = _model_config(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  bf16_params = hf.import_params(tmp_path, bf16_config, _mesh())
  logits = _our_logits(bf16_params, bf16_config, tokens)
  log_p, log_q = _log_softmax(reference.astype(np.float64)), _log_softmax(logits.astype(np.float64))
  kl_per_token = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  assert float(kl_per_token.mean()) <= 1e-3


def test_llama31_rope_scaling_matches_transformers(tmp_path):
  model = _hf_model("llama", rope_parameters={"rope_theta": 10000.0, **LLAMA31_ROPE})
  model.save_pretrained(tmp_path)
  model_config = _model_config(tmp_path)
  assert model_config.rope_scaling_type == "llama3"
  assert model_config.rope_original_max_position == 16
  params = hf.import_params(tmp_path, model_config, _mesh())
  tokens = _tokens(2)
  ours = _our_logits(params, model_config, tokens)
  reference = _torch_logits(model, tokens)
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
  unscaled = ModelConfig.from_config({**model_config.__dict__, "rope_scaling_type": ""})
  assert np.abs(_our_logits(params, unscaled, tokens) - reference).max() > 1e-2  # the test can tell


def test_sharded_safetensors_onto_a_device_mesh(tmp_path):
  """An index + several shard files, imported onto fsdp=4 x tensor=2, scanned or not."""
  model = _hf_model("llama", seed=3)
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / hf.INDEX_FILE).is_file()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  mesh = _mesh(fsdp=4, tensor=2)
  tokens = _tokens(3)
  reference = _torch_logits(model, tokens)
  for scan_layers in (True, False):
    model_config = _model_config(tmp_path, scan_layers=scan_layers)
    params = hf.import_params(tmp_path, model_config, mesh)
    q_proj = (
        params["layers"]["attn"]["q_proj"]["kernel"] if scan_layers else params["layers_1"]["attn"]["q_proj"]["kernel"]
    )
    assert len({s.device for s in q_proj.addressable_shards}) == 8
    assert q_proj.addressable_shards[0].data.shape[-3:] == (64 // 4, 4 // 2, 16)
    np.testing.assert_allclose(_our_logits(params, model_config, tokens), reference, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen2", {}),
        ("llama", {"rope_parameters": {"rope_theta": 50000.0, **LLAMA31_ROPE}}),
    ],
)
def test_import_export_round_trip_through_transformers(family, overrides, tmp_path):
  model = _hf_model(family, seed=5, **overrides)
  hf_dir, ckpt_dir, out_dir = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "exported"
  model.save_pretrained(hf_dir)
  for name in ("tokenizer.json", "tokenizer_config.json"):  # stand-ins: export copies them as they are
    (hf_dir / name).write_text("{}")
  config = _base_config()
  config.model.scan_layers = family == "qwen2"  # both layouts go through export

  saved = hf.import_to_checkpoint(hf_dir, ckpt_dir, _mesh(fsdp=2, tensor=2, required=False), config)
  assert saved.model.family == family and saved.data.chat_template == ("qwen" if family == "qwen2" else "plain")
  assert checkpoint.load_config(ckpt_dir).model.num_layers == 2
  assert (ckpt_dir / hf.TOKENIZER_SUBDIR / "tokenizer_config.json").is_file()

  hf.export_checkpoint(ckpt_dir, out_dir, dtype="float32", max_shard_bytes=60_000)
  assert (out_dir / hf.INDEX_FILE).is_file() and (out_dir / "tokenizer_config.json").is_file()
  written = json.loads((out_dir / "config.json").read_text())
  assert written["architectures"] == [model.__class__.__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  tokens = _tokens(5)
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(model, tokens), atol=1e-6, rtol=0)


def test_export_in_bfloat16_single_file(tmp_path):
  model = _hf_model("mistral", seed=6)
  model.save_pretrained(tmp_path / "hf")
  hf.import_to_checkpoint(tmp_path / "hf", tmp_path / "ckpt", _mesh(), _base_config())
  hf.export_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16")
  assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == [hf.SINGLE_FILE]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert reloaded.dtype == torch.bfloat16
  expected = model.to(torch.bfloat16).state_dict()
  for name, tensor in reloaded.state_dict().items():
    assert torch.equal(tensor, expected[name]), name


# ------------------------------------------------------------------------------ config.json
def _write_config(directory: Path, **fields) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  base = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": 32,
      "hidden_size": 32,
      "num_hidden_layers": 1,
      "num_attention_heads": 4,
      "intermediate_size": 64,
  }
  base.update(fields)
  (directory / "config.json").write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
  return directory


def test_config_reads_transformers4_keys_and_defaults(tmp_path):
  directory = _write_config(
      tmp_path,
      rope_theta=500000.0,
      rms_norm_eps=1e-5,
      rope_scaling={
          "type": "llama3",
          "factor": 32.0,
          "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192,
      },
  )
  overrides = hf.hf_model_config(directory)
  assert overrides["num_kv_heads"] == 4 and overrides["head_dim"] == 8  # MHA default, hidden / heads
  assert overrides["rope_theta"] == 500000.0 and overrides["rope_scaling_factor"] == 32.0
  assert overrides["tie_embeddings"] is False and overrides["qkv_bias"] is False
  assert overrides["initializer_range"] == 0.02  # transformers' default when the file has none
  ModelConfig.from_config(overrides)  # every key is a valid model field


def test_initializer_range_travels_both_ways(tmp_path):
  overrides = hf.hf_model_config(_write_config(tmp_path, initializer_range=0.05))
  assert overrides["initializer_range"] == 0.05
  model_config = ModelConfig.from_config(overrides)
  assert hf.hf_config_dict(model_config, "llama", "float32")["initializer_range"] == 0.05


@pytest.mark.parametrize(
    "tokenizer_json, template_file, expected",
    [
        ('{"added_tokens": []}', None, "plain"),
        ('{"added_tokens": [{"content": "<|start_header_id|>"}]}', None, "llama3"),
        ('{"added_tokens": [{"content": "<|start_header_id|>"}]}', "tokenizer_config.json", "llama3_1"),
        ('{"added_tokens": [{"content": "<|start_header_id|>"}]}', "chat_template.jinja", "llama3_1"),
    ],
)
def test_named_fallback_tells_llama3_from_llama3_1(tokenizer_json, template_file, expected, tmp_path):
  (tmp_path / "tokenizer.json").write_text(tokenizer_json)
  if template_file:
    (tmp_path / template_file).write_text(json.dumps({"chat_template": "Cutting Knowledge Date: December 2023"}))
  assert chat_templates.named_template_for("llama", tmp_path) == expected
  assert chat_templates.named_template_for("qwen2", tmp_path) == "qwen"
  # A model with a template of its own is imported with it.
  assert chat_templates.template_for_import("llama", tmp_path) == ("model" if template_file else expected)


def test_mistral_sliding_window_matches_transformers(tmp_path):
  """A window of 5 in 24-token sequences: most queries lose keys, so any off-by-one shows."""
  model = _hf_model("mistral", sliding_window=5)
  model.save_pretrained(tmp_path)
  model_config = _model_config(tmp_path)
  assert model_config.sliding_window == 5
  params = hf.import_params(tmp_path, model_config, _mesh())
  tokens = _tokens()
  want = _torch_logits(model, tokens)
  np.testing.assert_allclose(_our_logits(params, model_config, tokens), want, atol=1e-4, rtol=0)
  full = dataclasses.replace(model_config, sliding_window=0)
  assert np.abs(_our_logits(params, full, tokens) - want).max() > 1e-2  # the window matters here
  assert hf.hf_config_dict(model_config, "mistral", "float32")["sliding_window"] == 5


def test_qwen2_sliding_window_warns_or_refuses(tmp_path, caplog):
  """Qwen2's use_sliding_window (a window on some layers only) is not implemented."""
  directory = _write_config(
      tmp_path, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096, use_sliding_window=True
  )
  with caplog.at_level(logging.WARNING):
    assert hf.hf_model_config(directory, max_length=4096)["family"] == "qwen2"
  assert "sliding_window=4096 is not implemented" in caplog.text
  with pytest.raises(ValueError, match="sliding_window=4096.*max length 8192"):
    hf.hf_model_config(directory, max_length=8192)
  qwen = _write_config(
      tmp_path / "off",
      architectures=["Qwen2ForCausalLM"],
      model_type="qwen2",
      sliding_window=4096,
      use_sliding_window=False,
  )
  assert hf.hf_model_config(qwen, max_length=8192)["qkv_bias"] is True  # window off: no limit


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture.*GPT2LMHeadModel"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"vocab_size": None}, "missing field 'vocab_size'"),
    ],
)
def test_unsupported_configs_name_the_field(tmp_path, fields, message):
  directory = _write_config(tmp_path, **fields)
  with pytest.raises(ValueError, match=message) as error:
    hf.hf_model_config(directory)
  assert "config.json" in str(error.value)


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
  directory = tmp_path_factory.mktemp("llama")
  _hf_model("llama").save_pretrained(directory)
  return directory


def _copy_model(source: Path, target: Path) -> Path:
  target.mkdir()
  for name in ("config.json", hf.SINGLE_FILE):
    (target / name).write_bytes((source / name).read_bytes())
  return target


def test_missing_files_are_named(saved_llama, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.hf_model_config(tmp_path)
  directory = _copy_model(saved_llama, tmp_path / "m")
  (directory / hf.SINGLE_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.import_params(directory, _model_config(directory), _mesh())
  (directory / hf.INDEX_FILE).write_text(
      json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
  )
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors.*lm_head.weight"):
    hf.import_params(directory, _model_config(directory), _mesh())


def _rewrite_tensors(path: Path, edit) -> None:
  """Re-saves a safetensors file after `edit(dict name -> array)`."""
  infos = hf.read_safetensors_header(path)
  arrays = {name: hf.read_rows(info, 0, info.shape[0]) for name, info in infos.items()}
  edit(arrays)
  hf.write_safetensors(path, [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__)


def test_wrong_shape_missing_and_extra_tensors_are_named(saved_llama, tmp_path):
  cases = {
      "wrong_shape": (
          lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}),
          r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape \[95, 64\], expected \[96, 64\]",
      ),
      "missing": (lambda t: t.pop("model.norm.weight"), "tensor 'model.norm.weight'.*is missing"),
      "extra": (
          lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
          "no place for.*o_proj.bias",
      ),
  }
  for case, (edit, message) in cases.items():
    directory = _copy_model(saved_llama, tmp_path / case)
    _rewrite_tensors(directory / hf.SINGLE_FILE, edit)
    with pytest.raises(ValueError, match=message):
      hf.import_params(directory, _model_config(directory), _mesh())


def test_model_config_that_disagrees_with_config_json_is_refused(saved_llama):
  wrong = _model_config(saved_llama, rope_theta=500000.0)
  with pytest.raises(ValueError, match="model.rope_theta=500000.0 but .*config.json says 10000.0"):
    hf.import_params(saved_llama, wrong, _mesh())


def test_a_different_initializer_range_is_no_mismatch(saved_llama):
  """How the weights started does not change what the imported weights compute."""
  hf.import_params(saved_llama, _model_config(saved_llama, initializer_range=0.3), _mesh())


@pytest.mark.parametrize(
    "kind,shape", [("same", (6, 4)), ("transpose", (6, 4)), ("qkv", (4, 3, 2)), ("qkv_bias", (3, 2)), ("o", (3, 2, 4))]
)
def test_each_layout_kind_reads_back_every_block_of_what_it_exports(kind, shape):
  """The four views of one layout kind agree: any block read from the exported HF tensor
  (only the rows and columns hf_ranges names) is that block of the original parameter."""
  ours = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  theirs = hf.to_hf_layout(kind, ours)
  assert theirs.shape == hf.hf_shape(kind, shape)
  halves = [((0, n // 2 or 1), (n // 2 or 1, n)) for n in shape]
  for block in itertools.product(*halves):
    rows, cols = hf.hf_block_ranges(kind, block, shape)
    part = theirs[rows[0] : rows[1]] if cols is None else theirs[rows[0] : rows[1], cols[0] : cols[1]]
    got = hf.from_hf_block(kind, part, block, shape)
    want = ours[tuple(slice(a, b) for a, b in block)]
    np.testing.assert_array_equal(got, want, err_msg=f"{kind} block {block}")
