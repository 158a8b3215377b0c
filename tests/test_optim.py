"""The optimizer: warmup then decay, AdamW without decay on norms and biases, clipping.

(Gradient accumulation is done by the train step; its equivalence with one big batch is
tested in test_sharding.py next to the other train-step layouts, sharing their compiles.)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cftjax import optim
from cftjax.model import ModelConfig, Transformer
from configs import base


def optim_config(**changes) -> ml_collections.ConfigDict:
  config = base.get_config().optim
  config.update(dict(learning_rate=1e-3, warmup_steps=10, end_lr_ratio=0.1, schedule="cosine"))
  config.update(changes)
  return config


def learning_rates(config, num_steps: int) -> np.ndarray:
  """The schedule at steps 0..num_steps (the value at num_steps is where decay ends)."""
  schedule = optim.learning_rate_schedule(config, num_steps)
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(num_steps + 1)), np.float64)


# ------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_warmup_then_decay_reaches_peak_and_end_at_the_right_steps(kind):
  lr = learning_rates(optim_config(schedule=kind), num_steps=110)
  peak, end = 1e-3, 1e-4
  # Linear warmup: step k (0-based) uses peak * (k + 1) / warmup, the peak on step 9.
  np.testing.assert_allclose(lr[:10], peak * np.arange(1, 11) / 10, rtol=1e-6)
  np.testing.assert_allclose(lr[10], peak, rtol=1e-6)
  # Halfway through the decay both schedules are halfway between peak and end.
  np.testing.assert_allclose(lr[60], (peak + end) / 2, rtol=1e-5)
  np.testing.assert_allclose(lr[110], end, rtol=1e-5)  # the configured end value
  assert np.all(np.diff(lr[10:]) <= 1e-12) and lr[109] > end
  if kind == "cosine":
    np.testing.assert_allclose(lr[35], end + (peak - end) * 0.5 * (1 + np.cos(np.pi * 0.25)), rtol=1e-5)
  else:
    np.testing.assert_allclose(lr[35], peak - (peak - end) * 0.25, rtol=1e-5)


def test_the_papers_recipe_warmup_ratio_and_cosine_to_zero():
  config = optim_config(warmup_steps=-1, warmup_ratio=0.1, end_lr_ratio=0.0, learning_rate=5e-6)
  assert optim.warmup_steps(config, 200) == 20
  lr = learning_rates(config, num_steps=200)
  np.testing.assert_allclose(lr[19], 5e-6, rtol=1e-6)
  assert lr[18] < 5e-6
  assert lr[200] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_and_no_warmup():
  lr = learning_rates(optim_config(schedule="constant", warmup_steps=0), num_steps=20)
  np.testing.assert_allclose(lr, 1e-3, rtol=1e-6)  # step 0 already at the peak


def test_wsd_holds_the_peak_then_decays_by_cosine_over_the_last_share():
  lr = learning_rates(optim_config(schedule="wsd", decay_ratio=0.2), num_steps=110)
  peak, end = 1e-3, 1e-4
  np.testing.assert_allclose(lr[:10], peak * np.arange(1, 11) / 10, rtol=1e-6)
  # 100 post-warmup steps: the peak through step 89, then 20 steps of cosine to the end.
  np.testing.assert_allclose(lr[10:91], peak, rtol=1e-6)
  np.testing.assert_allclose(lr[100], (peak + end) / 2, rtol=1e-5)
  np.testing.assert_allclose(lr[110], end, rtol=1e-5)
  assert lr[91] < peak and np.all(np.diff(lr[90:]) < 0)


def test_wsd_with_the_whole_run_decaying_is_cosine():
  np.testing.assert_allclose(
      learning_rates(optim_config(schedule="wsd", decay_ratio=1.0), num_steps=50),
      learning_rates(optim_config(schedule="cosine"), num_steps=50),
      rtol=1e-6,
  )


def test_warmup_longer_than_the_run_is_clipped():
  config = optim_config(warmup_steps=50)
  assert optim.warmup_steps(config, 20) == 20
  lr = learning_rates(config, num_steps=20)
  np.testing.assert_allclose(lr[19], 1e-3, rtol=1e-6)


@pytest.mark.parametrize(
    "changes, num_steps, message",
    [
        ({"schedule": "exp"}, 10, "optim.schedule='exp'"),
        ({"schedule": "wsd", "decay_ratio": 0.0}, 10, "optim.decay_ratio=0.0"),
        ({"warmup_steps": -1, "warmup_ratio": 1.5}, 10, "optim.warmup_ratio=1.5"),
        ({}, 0, "positive number of steps"),
    ],
)
def test_bad_schedule_config_fails_naming_the_key(changes, num_steps, message):
  with pytest.raises(ValueError, match=message):
    optim.learning_rate_schedule(optim_config(**changes), num_steps)


# ------------------------------------------------------------------------------ weight decay
def model_params():
  config = ModelConfig(
      vocab_size=16,
      hidden_size=8,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      head_dim=4,
      intermediate_size=16,
      qkv_bias=True,
  )
  dummy = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), dummy, dummy, dummy + 1))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), nn.meta.unbox(abstract)["params"])


def test_weight_decay_mask_excludes_norm_scales_and_biases_only():
  params = model_params()
  mask = optim.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  excluded = sorted(k for k, m in flat.items() if not m)
  assert excluded == sorted(k for k in flat if k.endswith("['scale']") or k.endswith("['bias']"))
  assert len(excluded) == 6  # 3 norm scales, 3 biases (q, k, v)
  assert flat["['embed']['embedding']"] and flat["['layers']['attn']['q_proj']['kernel']"]
  assert flat["['lm_head']['kernel']"]


def test_adamw_decays_matrices_but_not_norms_or_biases():
  params = model_params()
  tx, _ = optim.make_optimizer(
      optim_config(schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.0, learning_rate=0.01),
      num_steps=10,
  )
  zero_grads = jax.tree.map(np.zeros_like, params)  # Adam's own update is 0: only decay moves
  updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    param = params
    for key in path:
      param = param[key.key]
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']") or name.endswith("['bias']"):
      np.testing.assert_array_equal(update, 0.0, err_msg=name)
    else:
      np.testing.assert_allclose(update, -0.01 * 0.1 * param, rtol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------ clipping
def adam_state(opt_state):
  states = [
      s
      for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)
  ]
  assert len(states) == 1
  return states[0]


@pytest.mark.parametrize("grad_scale, clip", [(100.0, 1.0), (0.01, 1.0), (100.0, 0.0)])
def test_gradients_are_clipped_to_the_global_norm_before_adam(grad_scale, clip):
  params = {"a": np.ones((3, 4), np.float32), "b": {"scale": np.ones((4,), np.float32)}}
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: (grad_scale * rng.standard_normal(p.shape)).astype(np.float32), params)
  norm = float(optax.global_norm(grads))
  tx, _ = optim.make_optimizer(optim_config(grad_clip_norm=clip, b1=0.9, b2=0.95), num_steps=10)
  _, opt_state = jax.jit(tx.update)(grads, tx.init(params), params)
  factor = min(1.0, clip / norm) if clip > 0 else 1.0
  state = adam_state(opt_state)
  for got, g in zip(jax.tree.leaves(state.mu), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, 0.1 * g * factor, rtol=1e-5)  # (1 - b1) * clipped grad
  for got, g in zip(jax.tree.leaves(state.nu), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, 0.05 * (g * factor) ** 2, rtol=1e-4)  # (1 - b2) * clipped grad^2
