"""Batched text generation with a KV cache, compiled once per shape and setting.

Prompts are left-padded so every row's last prompt token sits in the same cache slot and
one decode step serves the whole batch. Padding never leaks into a row's result: pad
slots carry segment id 0, real tokens id 1 (the model's attention only pairs equal ids),
and RoPE positions count from each row's first real token. Sampling keys are derived per
prompt from (seed, prompt index), so a prompt's output does not depend on which other
prompts share its batch, on the batch size or on the padding.

The decode loop runs on device (`lax.while_loop`) and ends as soon as every row has
emitted an EOS id; a finished row keeps emitting `pad_id`. Stop strings are text, so they
are applied on the host after decoding: the device always runs to EOS or max_new_tokens,
then each output is cut after the token that completes the first stop string
(`cut_tokens_at_stop_strings`); `truncate_at_stop_strings` removes the stop string itself
from decoded text.

Shapes are bucketed (prompt length: powers of two, then multiples of 128; batch: powers
of two up to batch_size) so a long evaluation compiles a handful of programs, not one per
batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from cftjax import sharding as sharding_lib
from cftjax.model import ModelConfig, Transformer, init_cache, transpose_kernels

Array = jax.Array

DEFAULT_BATCH_SIZE = 32
MIN_PROMPT_BUCKET = 16
PROMPT_BUCKET_STEP = 128


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens and when to stop.

  temperature 0 means greedy (argmax); otherwise tokens are drawn from
  softmax(logits / temperature) restricted to the smallest set of most likely tokens
  whose probability reaches top_p (nucleus sampling; top_p=1 keeps everything).
  """

  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  eos_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    # Lists are accepted for convenience and frozen so the config stays hashable.
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
    if int(self.max_new_tokens) < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1]")
    if not 0 <= int(self.seed) < 2**32:
      raise ValueError(f"SamplingConfig.seed={self.seed} must be in [0, 2**32)")
    if any(not s for s in self.stop_strings):
      raise ValueError(f"SamplingConfig.stop_strings={self.stop_strings!r} contains an empty string")


# ------------------------------------------------------------------------------ shapes
def bucket_prompt_length(length: int, minimum: int = MIN_PROMPT_BUCKET, step: int = PROMPT_BUCKET_STEP) -> int:
  """Padded prompt length: next power of two (>= minimum) up to `step`, then a multiple of it."""
  if length <= step:
    return max(minimum, 1 << max(0, length - 1).bit_length())
  return -(-length // step) * step


def bucket_batch_size(num_rows: int, batch_size: int, multiple: int = 1) -> int:
  """Padded batch: next power of two, capped at batch_size, rounded up to `multiple`."""
  rows = min(1 << max(0, num_rows - 1).bit_length(), batch_size)
  rows = max(rows, num_rows)
  return -(-rows // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, length] int32 with prompts right-aligned, lengths [B] int32)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  lengths = np.zeros((len(prompts),), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt) > length:
      raise ValueError(f"prompt {row} has {len(prompt)} tokens, more than the padded length {length}")
    if prompt:
      tokens[row, length - len(prompt) :] = prompt
    lengths[row] = len(prompt)
  return tokens, lengths


@jax.jit
def _fold_in_indices(seed: Array, prompt_indices: Array) -> Array:
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), prompt_indices)


def row_keys(seed: int, prompt_indices: np.ndarray) -> Array:
  """One raw PRNG key per prompt ([B, 2] uint32), a function of (seed, prompt index) only."""
  return _fold_in_indices(jnp.uint32(seed), jnp.asarray(prompt_indices, jnp.uint32))


# ------------------------------------------------------------------------------ sampling
def top_p_filter(logits_BxV: Array, top_p: float) -> Array:
  """Sets logits outside the nucleus (smallest top set with mass >= top_p) to -inf.

  The nucleus is {p >= t} for the largest probability t whose set {p >= t} still holds
  top_p of the mass. Instead of sorting the vocabulary (slow to compile on CPU, slow to
  run for 150k vocabularies) t is found by bisection over the bit patterns of positive
  float32 values, which order like the integers: 31 exact steps of one masked sum each.
  Ties at t are all kept.
  """
  probs = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

  def mass_at_least(threshold_bits_B):
    keep = bits >= threshold_bits_B[:, None]
    return jnp.sum(jnp.where(keep, probs, 0.0), axis=-1)

  def halve(_, bounds):
    # Invariant: mass_at_least(low) >= top_p > mass_at_least(high).
    low, high = bounds
    mid = low + (high - low) // 2
    ok = mass_at_least(mid) >= top_p
    return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

  low = jnp.zeros(bits.shape[:1], jnp.int32)
  high = jnp.max(bits, axis=-1) + 1
  low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
  return jnp.where(bits >= low[:, None], logits_BxV, -jnp.inf)


def choose_tokens(logits_BxV: Array, keys_B: Array, step: Array, temperature: float, top_p: float) -> Array:
  """Next token per row: argmax when temperature == 0, else temperature + top-p sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
  scaled = logits_BxV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    scaled = top_p_filter(scaled, top_p)
  return jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)


def _head_on_last_position(next_fun, args, kwargs, context):
  """flax method interceptor: the Transformer's output head sees only the last position.

  Prefill needs the next-token logits of the last slot only; the full [B, P, V] float32
  logits would be gigabytes for 150k-token vocabularies. The model has no switch for this,
  so the head's input is sliced on its way in (untied `lm_head`, or tied `embed.attend`).
  """
  module = context.module
  is_head = isinstance(module.parent, Transformer) and (
      (module.name == "lm_head" and context.method_name == "__call__")
      or (module.name == "embed" and context.method_name == "attend")
  )
  if is_head:
    args = (args[0][:, -1:],) + tuple(args[1:])
  return next_fun(*args, **kwargs)


def _is_eos(tokens_B: Array, eos_ids: tuple[int, ...]) -> Array:
  if not eos_ids:
    return jnp.zeros(tokens_B.shape, bool)
  return jnp.isin(tokens_B, jnp.asarray(eos_ids, jnp.int32))


# ------------------------------------------------------------------------------ device program
# On CPU, generate() decodes generations of at least this many tokens with the kernels
# transposed once per call (`decode_layout`): the transposition costs about two decoding
# steps (100M model: 110 ms, a step at batch 16 ~50 ms), and each step then runs ~1.25x faster.
CPU_TRANSPOSE_MIN_NEW_TOKENS = 16


def unrolled_layers(model: Transformer, params: Any) -> tuple[Transformer, Any]:
  """The model with its layers unrolled (scan_layers=False) and its params to match.

  A scanned model slices every layer's weights out of the stacked params at each decode
  step (a copy of all weights per token on CPU); unstacking once per call costs one copy.
  """
  if not model.config.scan_layers:
    return model, params
  unrolled = {name: value for name, value in params.items() if name != "layers"}
  for i in range(model.config.num_layers):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return model.clone(config=dataclasses.replace(model.config, scan_layers=False)), unrolled


def decode_layout(model: Transformer, params: Any, max_new_tokens: int, mesh=None) -> tuple[Transformer, Any]:
  """(model, params) to decode `max_new_tokens` with: on CPU, for a generation long enough to
  repay it, the layers unrolled and every projection kernel transposed to [out, in]
  (cftjax.model.transpose_kernels), once for all of generate()'s batches; as given elsewhere."""
  if jax.default_backend() != "cpu" or max_new_tokens < CPU_TRANSPOSE_MIN_NEW_TOKENS:
    return model, params
  decode_model = model.clone(config=dataclasses.replace(model.config, scan_layers=False, transposed_kernels=True))
  return decode_model, _compiled_decode_layout(model.config, mesh)(params)


@functools.lru_cache(maxsize=16)
def _compiled_decode_layout(config: ModelConfig, mesh):
  relayout = jax.jit(lambda params: transpose_kernels(*unrolled_layers(Transformer(config), params))[1])
  return relayout if mesh is None else sharding_lib.on_mesh(relayout, mesh)


def generate_tokens(
    params: Any,
    prompt_tokens_BxP: Array,
    prompt_lengths_B: Array,
    rng_B: Array,
    *,
    model: Transformer,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> tuple[Array, Array]:
  """Prefill left-padded prompts, then decode on device until EOS or max_new_tokens.

  Args:
    params: the model's parameter dict (the contents of flax's {"params": ...}).
    prompt_tokens_BxP: prompts right-aligned in P slots (see `left_pad`).
    prompt_lengths_B: real tokens per row, each >= 1.
    rng_B: one raw PRNG key per row ([B, 2] uint32); unused when temperature == 0.
  Returns:
    tokens_BxN: new tokens (N = max_new_tokens); a row's EOS is kept where it was produced,
      every slot after it holds pad_id.
    num_tokens_B: new tokens per row before its EOS (EOS itself not counted).
  """
  batch, prompt_len = prompt_tokens_BxP.shape
  model, params = unrolled_layers(model, params)
  variables = {"params": params}
  prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)

  slots_P = jnp.arange(prompt_len, dtype=jnp.int32)
  num_pad_B = prompt_len - prompt_lengths_B
  segment_ids_BxP = (slots_P[None, :] >= num_pad_B[:, None]).astype(jnp.int32)
  positions_BxP = jnp.maximum(slots_P[None, :] - num_pad_B[:, None], 0)

  # The last new token is never fed back, so P + N - 1 slots suffice.
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens - 1)
  layer_axes = ("act_batch", "act_kv_heads", None, None)
  for name in ("k", "v"):
    axes = (None, *layer_axes) if model.config.scan_layers else layer_axes  # see init_cache
    cache[name] = jax.tree.map(lambda c, axes=axes: nn.with_logical_constraint(c, axes), cache[name])

  # Pad slots are masked out, but they still pass through the model: feed token 0 there so
  # a pad_id outside the vocabulary cannot turn them into NaN (0 * NaN leaks through).
  model_tokens_BxP = jnp.where(segment_ids_BxP == 1, prompt_tokens_BxP, 0)
  with nn.intercept_methods(_head_on_last_position):
    logits_Bx1xV, cache = model.apply(variables, model_tokens_BxP, positions_BxP, segment_ids_BxP, cache)
  first_B = choose_tokens(logits_Bx1xV[:, -1], rng_B, jnp.int32(0), temperature, top_p)
  done_B = _is_eos(first_B, eos_ids)
  out_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
  num_tokens_B = (~done_B).astype(jnp.int32)
  ones_Bx1 = jnp.ones((batch, 1), jnp.int32)

  def keep_going(state):
    step, _, _, done_B, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def decode_step(state):
    # `step` = tokens produced so far; the last one is fed at its row's next position.
    step, cache, last_B, done_B, out_BxN, num_tokens_B = state
    positions_Bx1 = (prompt_lengths_B + step - 1)[:, None]
    fed_B = jnp.where(done_B, 0, last_B)  # finished rows hold pad_id: keep it out of the model
    logits_Bx1xV, cache = model.apply(variables, fed_B[:, None], positions_Bx1, ones_Bx1, cache)
    new_B = choose_tokens(logits_Bx1xV[:, 0], rng_B, step, temperature, top_p)
    new_B = jnp.where(done_B, pad_id, new_B)
    out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, new_B[:, None], step, axis=1)
    done_B = done_B | _is_eos(new_B, eos_ids)
    num_tokens_B = num_tokens_B + (~done_B).astype(jnp.int32)
    return step + 1, cache, new_B, done_B, out_BxN, num_tokens_B

  state = (jnp.int32(1), cache, first_B, done_B, out_BxN, num_tokens_B)
  _, _, _, _, out_BxN, num_tokens_B = jax.lax.while_loop(keep_going, decode_step, state)
  return out_BxN, num_tokens_B


def compiled_generate_tokens(
    config: ModelConfig,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[..., tuple[Array, Array]]:
  """jit of `generate_tokens` per (model config, settings, mesh); jit caches per shape.

  With a mesh the program is traced under the mesh and the logical axis rules, so the
  model's activation constraints (batch over data x fsdp, heads over tensor) apply.
  """
  # Normalised so equal settings always hit the same cache entry.
  return _compiled_generate_tokens(
      config,
      int(max_new_tokens),
      float(temperature),
      float(top_p),
      tuple(int(i) for i in eos_ids),
      int(pad_id),
      mesh,
  )


@functools.lru_cache(maxsize=64)
def _compiled_generate_tokens(config, max_new_tokens, temperature, top_p, eos_ids, pad_id, mesh):
  body = functools.partial(
      generate_tokens,
      model=Transformer(config),
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      eos_ids=eos_ids,
      pad_id=pad_id,
  )
  jitted = jax.jit(body)
  return jitted if mesh is None else sharding_lib.on_mesh(jitted, mesh)


def _place_rows(x: np.ndarray, mesh: jax.sharding.Mesh) -> Array:
  """Every process holds the whole batch; each device takes its rows of it."""
  return jax.make_array_from_callback(x.shape, sharding_lib.batch_sharding(mesh), lambda index: x[index])


# ------------------------------------------------------------------------------ stop strings
def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
  """Text before the earliest occurrence of any stop string (unchanged if none occurs)."""
  cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
  return text[:cut]


def cut_tokens_at_stop_strings(
    tokens: Sequence[int], decode: Callable[[Sequence[int]], str], stop_strings: Sequence[str]
) -> list[int]:
  """Shortest prefix of `tokens` whose decoded text contains a stop string (all if none).

  The token completing the stop string is kept, so the text may run a few characters past
  it; `truncate_at_stop_strings` on the decoded text gives the clean cut. Binary search:
  O(log n) decodes, relying on "prefix contains a stop string" growing with the prefix.
  """
  tokens = list(tokens)

  def has_stop(n: int) -> bool:
    text = decode(tokens[:n])
    return any(s in text for s in stop_strings)

  if not stop_strings or not has_stop(len(tokens)):
    return tokens
  low, high = 0, len(tokens)  # has_stop(high) is True; find the smallest such n.
  while low < high:
    mid = (low + high) // 2
    if has_stop(mid):
      high = mid
    else:
      low = mid + 1
  return tokens[:high]


# ------------------------------------------------------------------------------ host driver
def _unwrap_params(params: Any) -> Any:
  """Accepts the parameter dict or flax's {"params": ...} wrapper around it."""
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
  for index, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompts[{index}] is empty; every prompt needs at least one token")
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompts[{index}] must be a flat list of int token ids")
    if ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError(
          f"prompts[{index}] has token id {int(ids.min() if ids.min() < 0 else ids.max())} "
          f"outside the model's vocabulary [0, {vocab_size})"
      )


def generate(
    model: Transformer,
    params: Any,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> list[list[int]]:
  """New tokens for each prompt (in input order), without EOS or padding.

  Prompts are sorted by length and run in batches of at most batch_size (so padding stays
  small); results do not depend on the batching. With a mesh, rows are sharded over
  ("data", "fsdp") and the model's logical sharding rules apply; params must already be
  placed. With sampling.stop_strings, `decode` (token ids -> text) is required and each
  output is cut after the token that completes the first stop string.
  """
  config = model.config
  if sampling.stop_strings and decode is None:
    raise ValueError("SamplingConfig.stop_strings is set but generate() got no decode function")
  batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  _check_prompts(prompts, config.vocab_size)
  model, params = decode_layout(model, _unwrap_params(params), sampling.max_new_tokens, mesh)
  config = model.config
  row_multiple = 1
  if mesh is not None:
    row_multiple = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
  run = compiled_generate_tokens(
      config,
      sampling.max_new_tokens,
      sampling.temperature,
      sampling.top_p,
      sampling.eos_ids,
      sampling.pad_id,
      mesh,
  )

  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  results: list[list[int] | None] = [None] * len(prompts)
  bar = tqdm.tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
  for start in range(0, len(order), batch_size):
    indices = order[start : start + batch_size]
    rows = bucket_batch_size(len(indices), batch_size, row_multiple)
    # Filler rows repeat the first prompt; their outputs are discarded.
    batch_prompts = [list(prompts[i]) for i in indices] + [list(prompts[indices[0]])] * (rows - len(indices))
    batch_indices = np.array(indices + [indices[0]] * (rows - len(indices)), np.int64)
    length = bucket_prompt_length(max(len(p) for p in batch_prompts))
    tokens_BxP, lengths_B = left_pad(batch_prompts, length, sampling.pad_id)
    inputs = (tokens_BxP, lengths_B, np.asarray(row_keys(sampling.seed, batch_indices)))
    if mesh is not None:
      inputs = tuple(_place_rows(x, mesh) for x in inputs)
    out_BxN, num_B = (sharding_lib.to_host(x) for x in run(params, *inputs))
    for row, index in enumerate(indices):
      new_tokens = out_BxN[row, : num_B[row]].tolist()
      if sampling.stop_strings:
        new_tokens = cut_tokens_at_stop_strings(new_tokens, decode, sampling.stop_strings)
      results[index] = new_tokens
    bar.update(len(indices))
  bar.close()
  return results  # type: ignore[return-value]
