"""Generation: cached decoding is exact, rows are independent, EOS/stop strings, sampling, HF parity."""

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cftjax import generate as gen
from cftjax import hf, sharding
from cftjax.model import ModelConfig, Transformer, init_cache

VOCAB = 64
NEW_TOKENS = 8
# Lengths span two prompt buckets (16 and 32) and include a one-token prompt.
PROMPTS = [[3, 9, 4], list(range(5, 25)), [7], [11, 2, 30, 41, 8, 8, 19]]


def tiny_config(scan_layers: bool = True, sliding_window: int = 0) -> ModelConfig:
  return ModelConfig(
      vocab_size=VOCAB,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      intermediate_size=64,
      scan_layers=scan_layers,
      sliding_window=sliding_window,
  )


def init_params(config: ModelConfig, seed: int = 0, stddev: float = 0.1):
  """Random params in the model's layout, drawn with numpy (jit of model.init is slow to compile)."""
  model = Transformer(config)
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens, tokens + 1))
  rng = np.random.default_rng(seed)
  draw = lambda s: rng.normal(0.0, stddev, s.shape) if len(s.shape) > 1 else np.ones(s.shape)
  return model, jax.tree.map(lambda s: jnp.asarray(draw(s), jnp.float32), shapes["params"])


@pytest.fixture(scope="module")
def tiny():
  return init_params(tiny_config())


def settings(n=NEW_TOKENS, **kw) -> gen.SamplingConfig:
  """Greedy unless told otherwise."""
  return gen.SamplingConfig(max_new_tokens=n, **kw)


SAMPLED = settings(temperature=1.0, top_p=0.9, seed=3)
choose = jax.jit(gen.choose_tokens, static_argnums=(3, 4))


def make_mesh(data: int = 1, tensor: int = 1):
  devices = jax.devices()[: data * tensor]
  if len(devices) < data * tensor:
    pytest.skip(f"needs {data * tensor} devices (tests/conftest.py simulates 8 CPU devices)")
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=1, tensor=tensor)), devices)


def reference_greedy(model, params, prompts, num_new):
  """Repeated full forward passes without a cache, argmax of the last real position."""
  apply = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg)[0])
  length = max(len(p) for p in prompts) + num_new
  sequences = [list(p) for p in prompts]
  for _ in range(num_new):
    tokens = np.zeros((len(prompts), length), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for row, seq in enumerate(sequences):  # right padding: causal, so it changes nothing
      tokens[row, : len(seq)] = seq
      segments[row, : len(seq)] = 1
      positions[row, : len(seq)] = np.arange(len(seq))
    logits = np.asarray(apply(params, tokens, positions, segments))
    for row, seq in enumerate(sequences):
      seq.append(int(logits[row, len(seq) - 1].argmax()))
  return [seq[len(p) :] for seq, p in zip(sequences, prompts)]


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("scan_layers, sliding_window", [(True, 0), (False, 0), (True, 6)])
def test_cached_greedy_equals_full_forward_argmax(scan_layers, sliding_window):
  """With a sliding window of 6 the prompts (up to 20 tokens, left-padded in the cache)
  and the generated tokens all run past it."""
  model, params = init_params(tiny_config(scan_layers, sliding_window), seed=1)
  expected = reference_greedy(model, params, PROMPTS, NEW_TOKENS)
  got = gen.generate(model, params, PROMPTS, settings(), progress=False)
  assert got == expected
  assert all(len(row) == NEW_TOKENS for row in got)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_cpu_decode_layout_decodes_the_tokens_of_the_full_forward(monkeypatch, on_mesh):
  """Long enough generations decode with the layers unrolled and the kernels transposed
  (generate.decode_layout); the threshold is lowered so the usual 8 tokens take that path."""
  monkeypatch.setattr(gen, "CPU_TRANSPOSE_MIN_NEW_TOKENS", NEW_TOKENS)
  model, params = init_params(tiny_config(scan_layers=True), seed=1)
  decode_model, decode_params = gen.decode_layout(model, params, NEW_TOKENS)
  assert decode_model.config.transposed_kernels and not decode_model.config.scan_layers
  assert decode_params["layers_0"]["mlp"]["gate_proj"]["kernel"].shape == (64, 32)  # [mlp, embed]
  assert gen.decode_layout(model, params, NEW_TOKENS - 1) == (model, params)
  mesh, placed = None, params
  if on_mesh:
    mesh = make_mesh(data=2, tensor=2)
    tokens = jnp.zeros((1, 4), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens, tokens + 1)
    placed = jax.device_put(params, sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh)["params"])
  got = gen.generate(model, placed, PROMPTS, settings(), mesh=mesh, progress=False)
  assert got == reference_greedy(model, params, PROMPTS, NEW_TOKENS)


def test_row_output_independent_of_batch_neighbours(tiny):
  model, params = tiny
  row = [12, 5, 33, 2, 9]
  # Alone: 11 pad slots in a 1-row batch; mixed: 27 pad slots beside a 20-token prompt.
  neighbours = [list(range(1, 21)), [17, 3], [8]]
  alone = gen.generate(model, params, [row], settings(), progress=False)[0]
  assert alone == gen.generate(model, params, [row] + neighbours, settings(), progress=False)[0]
  # Sampling keys follow the prompt's index (0 in both calls), not its batch or padding.
  alone = gen.generate(model, params, [row], SAMPLED, progress=False)[0]
  assert alone == gen.generate(model, params, [row] + neighbours, SAMPLED, progress=False)[0]


def _all_shapes(jaxpr) -> set:
  """Shapes of every value a jaxpr (and the jaxprs nested in it) computes."""
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes |= _all_shapes(inner)
  return shapes


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_prefill_computes_logits_for_the_last_position_only(tie_embeddings):
  config = dataclasses.replace(tiny_config(), tie_embeddings=tie_embeddings, vocab_size=96)
  _, params = init_params(config)
  batch, length = 2, 16
  program = functools.partial(
      gen.generate_tokens,
      model=Transformer(config),
      max_new_tokens=4,
      temperature=0.0,
      top_p=1.0,
      eos_ids=(),
      pad_id=0,
  )
  tokens, lengths = gen.left_pad([[1, 2, 3], [4]], length, pad_id=0)
  jaxpr = jax.make_jaxpr(program)(params, tokens, lengths, np.zeros((batch, 2), np.uint32))
  shapes = _all_shapes(jaxpr.jaxpr)
  assert (batch, 1, 96) in shapes and (batch, length, 96) not in shapes


def test_params_wrapped_in_flax_variables_dict_accepted(tiny):
  model, params = tiny
  assert gen.generate(model, {"params": params}, PROMPTS, settings(), progress=False) == (
      gen.generate(model, params, PROMPTS, settings(), progress=False)
  )


def test_mesh_sharded_generation_equals_single_device(tiny):
  model, params = tiny
  mesh = make_mesh(data=2, tensor=2)
  tokens = jnp.zeros((1, 4), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens, tokens + 1)
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh)["params"]
  placed = jax.device_put(params, shardings)
  # Three prompts: the batch is padded to a multiple of the 2 data shards.
  on_mesh = gen.generate(model, placed, PROMPTS[:3], settings(), mesh=mesh, progress=False)
  assert on_mesh == gen.generate(model, params, PROMPTS, settings(), progress=False)[:3]


# ------------------------------------------------------------------------------ stopping
def test_eos_stops_each_row_at_its_first_eos(tiny):
  model, params = tiny
  free = gen.generate(model, params, PROMPTS, settings(), progress=False)
  eos = free[0][3]  # a token row 0 produces mid-way; other rows may or may not produce it
  eos_ids, pad_id = (eos, 0), VOCAB + 100  # a pad id outside the vocabulary is harmless
  stopped = gen.generate(model, params, PROMPTS, settings(eos_ids=eos_ids, pad_id=pad_id), progress=False)
  for free_row, stopped_row in zip(free, stopped):
    cut = next((i for i, t in enumerate(free_row) if t in eos_ids), len(free_row))
    assert stopped_row == free_row[:cut]
  assert len(stopped[0]) <= 3

  # The device program keeps the EOS, then pads; the count excludes the EOS.
  tokens, lengths = gen.left_pad(PROMPTS, 32, pad_id=pad_id)
  run = gen.compiled_generate_tokens(tiny_config(), NEW_TOKENS, 0.0, 1.0, eos_ids, pad_id)
  keys = np.asarray(gen.row_keys(0, np.arange(4)))  # numpy like generate(): same compiled program
  out, num = (np.asarray(x) for x in run(params, tokens, lengths, keys))
  first_eos = len(stopped[0])
  assert num.tolist() == [len(r) for r in stopped]
  assert out[0, first_eos] in eos_ids and (out[0, first_eos + 1 :] == pad_id).all()

  # A zero head ties every logit, so argmax picks token 0 = EOS: all rows end at once.
  zero_head = {**params, "lm_head": {"kernel": jnp.zeros_like(params["lm_head"]["kernel"])}}
  out, num = (np.asarray(x) for x in run(zero_head, tokens, lengths, keys))
  assert num.tolist() == [0] * 4 and (out[:, 0] == 0).all() and (out[:, 1:] == pad_id).all()


def test_stop_strings_cut_tokens_on_host(tiny):
  decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)
  assert gen.cut_tokens_at_stop_strings([0, 1, 2, 3, 4], decode, ["cd", "zz"]) == [0, 1, 2, 3]
  assert gen.cut_tokens_at_stop_strings([0, 1, 2], decode, ["zz"]) == [0, 1, 2]
  assert gen.truncate_at_stop_strings("abcdef", ["de", "bc"]) == "a"
  assert gen.truncate_at_stop_strings("abc", ["x"]) == "abc"

  model, params = tiny
  free = gen.generate(model, params, PROMPTS, settings(), progress=False)
  stop = decode(free[1][2:4])
  cut = gen.generate(model, params, PROMPTS, settings(stop_strings=(stop,)), progress=False, decode=decode)
  for free_row, cut_row in zip(free, cut):
    assert cut_row == gen.cut_tokens_at_stop_strings(free_row, decode, [stop])
  assert stop in decode(cut[1]) and len(cut[1]) <= 4
  with pytest.raises(ValueError, match="decode"):
    gen.generate(model, params, PROMPTS, settings(stop_strings=("x",)), progress=False)


# ------------------------------------------------------------------------------ sampling
def test_sampling_is_seeded_and_reproducible():
  # Near-uniform logits: two seeds agreeing on 4 x 8 draws would be a bug, not luck.
  model, params = init_params(tiny_config(), seed=2, stddev=0.02)
  sample = lambda seed: gen.generate(model, params, PROMPTS, dataclasses.replace(SAMPLED, seed=seed), progress=False)
  assert sample(0) == sample(0)
  assert sample(0) != sample(1)


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.array([[0.2, 0.5, 0.3]]))
  kept = np.isfinite(np.asarray(jax.jit(gen.top_p_filter, static_argnums=1)(logits, 0.6)))
  assert kept.tolist() == [[False, True, True]]
  keys = gen.row_keys(0, np.arange(2000))
  draws = np.asarray(choose(jnp.repeat(logits, 2000, axis=0), keys, jnp.int32(0), 1.0, 0.6))
  assert set(draws.tolist()) == {1, 2}
  assert 0.55 < (draws == 1).mean() < 0.70  # 0.5 / 0.8 = 0.625 after renormalising


def test_top_p_matches_sorted_cumulative_definition_and_tiny_top_p_is_greedy():
  rng = np.random.default_rng(0)
  logits = rng.normal(0.0, rng.uniform(0.1, 5.0, (64, 1)), (64, 100)).astype(np.float32)
  top_ps = rng.uniform(0.01, 1.0, 64)
  nucleus = jax.jit(jax.vmap(lambda l, p: gen.top_p_filter(l[None], p)[0]))
  kept = np.isfinite(np.asarray(nucleus(logits, top_ps.astype(np.float32))))
  for row, top_p in zip(range(64), top_ps):
    order = np.argsort(-logits[row], kind="stable")
    probs = np.asarray(jax.nn.softmax(logits[row]))[order]
    size = int(np.sum(np.cumsum(probs) - probs < top_p))
    assert set(np.flatnonzero(kept[row])) == set(order[:size].tolist()), row
  draws = choose(logits, gen.row_keys(1, np.arange(64)), jnp.int32(3), 1.0, 1e-6)
  assert np.asarray(draws).tolist() == logits.argmax(-1).tolist()


# ------------------------------------------------------------------------------ host helpers
def test_buckets_and_left_padding():
  assert [gen.bucket_prompt_length(n) for n in (1, 16, 17, 128, 129, 300)] == [16, 16, 32, 128, 256, 384]
  assert [gen.bucket_batch_size(n, 16) for n in (1, 3, 9, 16)] == [1, 4, 16, 16]
  assert gen.bucket_batch_size(3, 16, multiple=8) == 8
  tokens, lengths = gen.left_pad([[1, 2], [3]], 4, pad_id=9)
  assert tokens.tolist() == [[9, 9, 1, 2], [9, 9, 9, 3]] and lengths.tolist() == [2, 1]


def test_bad_input_raises_clear_errors(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
    gen.generate(model, params, [[1], []], settings(), progress=False)
  with pytest.raises(ValueError, match=r"prompts\[0\] has token id 64"):
    gen.generate(model, params, [[1, 64]], settings(), progress=False)
  with pytest.raises(ValueError, match="top_p"):
    gen.SamplingConfig(max_new_tokens=4, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.SamplingConfig(max_new_tokens=0)


# ------------------------------------------------------------------------------ HF parity
def test_greedy_matches_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_config = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      intermediate_size=64,
      max_position_embeddings=256,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      tie_word_embeddings=False,
      initializer_range=0.2,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=0,
  )
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(hf_config).eval()
  hf_model.save_pretrained(tmp_path)
  config = tiny_config()  # the same architecture; import_params checks it against config.json
  # Host copies: params committed to a mesh would compile a separate program.
  params = jax.tree.map(np.asarray, hf.import_params(tmp_path, config, make_mesh()))
  expected = []
  with torch.no_grad():
    for prompt in PROMPTS:  # batch 1 each: no HF padding semantics involved
      ids = torch.tensor([prompt])
      out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
      expected.append(out[0, len(prompt) :].tolist())
  # One left-padded batch on our side (same shapes as the other tests: no new compile).
  assert gen.generate(Transformer(config), params, PROMPTS, settings(), progress=False) == expected


def test_unrolled_layers_score_like_the_scanned_model():
  """Decoding unrolls a scanned model's layers once per call; the unrolled model with the
  unstacked params computes the scanned model's logits."""
  model, params = init_params(tiny_config(scan_layers=True), seed=3)
  unrolled, unrolled_params = gen.unrolled_layers(model, params)
  assert not unrolled.config.scan_layers and "layers" not in unrolled_params
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, model.config.vocab_size, (2, 12)), jnp.int32)
  positions, segments = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
  want, _ = model.apply({"params": params}, tokens, positions, segments)
  got, _ = unrolled.apply({"params": unrolled_params}, tokens, positions, segments)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decoding_writes_the_cache_in_place():
  """Each decode step writes one slot of each layer's keys/values and reads the cache as it
  lies: no op of the compiled loop copies, transposes or restacks a cache-sized buffer."""
  config = tiny_config(scan_layers=False)
  model, params = init_params(config)
  batch, length, new_tokens = 4, 32, 8
  program = functools.partial(
      gen.generate_tokens,
      model=model,
      max_new_tokens=new_tokens,
      temperature=0.0,
      top_p=1.0,
      eos_ids=(),
      pad_id=0,
  )
  tokens, lengths = gen.left_pad(PROMPTS, length, pad_id=0)
  text = jax.jit(program).lower(params, tokens, lengths, np.zeros((batch, 2), np.uint32)).compile().as_text()
  slots = length + new_tokens - 1
  one_layer = batch * config.num_kv_heads * slots * config.head_dim
  moved = []
  for match in re.finditer(r"= \w+\[([\d,]*)\]\S* (copy|transpose|concatenate)\(", text):
    dims = [int(d) for d in match.group(1).split(",") if d]
    if slots in dims and math.prod(dims) >= one_layer:  # a layer's keys or values, or more
      moved.append(match.group(0))
  assert not moved, moved


def test_scanned_model_decodes_from_its_stacked_cache_like_the_unrolled_one():
  """init_cache stacks the layers' keys/values for a scanned model and keeps one buffer per
  layer for an unrolled one; both decode to the same logits."""
  model, params = init_params(tiny_config(scan_layers=True), seed=2)
  unrolled, unrolled_params = gen.unrolled_layers(model, params)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(1, VOCAB, (2, 5)), jnp.int32)
  ones = jnp.ones((2, 5), jnp.int32)
  logits = []
  for m, p in ((model, params), (unrolled, unrolled_params)):
    cache = init_cache(m.config, 2, 8)
    assert isinstance(cache["k"], tuple) != m.config.scan_layers
    _, cache = m.apply({"params": p}, prompt, jnp.cumsum(ones, 1) - 1, ones, cache)
    step, _ = m.apply({"params": p}, prompt[:, :1], jnp.full((2, 1), 5), ones[:, :1], cache)
    logits.append(step)
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)
