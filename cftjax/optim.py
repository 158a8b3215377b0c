"""The optax chain: global-norm clipping, AdamW without decay on norms and biases,
warmup then cosine/linear/constant decay, or warmup-stable-decay (the peak held, then a
cosine over the last `optim.decay_ratio` of the steps).

Gradient accumulation is done by the train step itself (sums of micro-batch gradients of
a loss already normalised by the global token count), so the optimizer sees one exact
gradient per step.
"""

from typing import Any

import jax
import optax

from cftjax import sharding

SCHEDULES = ("cosine", "linear", "constant", "wsd")
NO_DECAY_LEAVES = ("scale", "bias")  # RMSNorm scales and projection biases


def warmup_steps(optim_config: Any, num_steps: int) -> int:
  if optim_config.warmup_steps >= 0:
    return min(int(optim_config.warmup_steps), num_steps)
  if not 0.0 <= optim_config.warmup_ratio <= 1.0:
    raise ValueError(f"config key optim.warmup_ratio={optim_config.warmup_ratio} must be in [0, 1]")
  return int(round(optim_config.warmup_ratio * num_steps))


def learning_rate_schedule(optim_config: Any, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then the configured decay to end_lr_ratio * peak."""
  if num_steps <= 0:
    raise ValueError(f"the schedule needs a positive number of steps, got {num_steps}")
  peak = float(optim_config.learning_rate)
  end = peak * float(optim_config.end_lr_ratio)
  warmup = warmup_steps(optim_config, num_steps)
  decay_steps = max(num_steps - warmup, 1)
  kind = optim_config.schedule
  alpha = end / peak if peak else 0.0  # cosine's floor as a fraction of the peak
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  elif kind == "wsd":
    decay = _stable_then_decay(optim_config, peak, alpha, decay_steps)
  else:
    raise ValueError(f"config key optim.schedule={kind!r} is not one of {SCHEDULES}")
  if warmup == 0:
    return decay
  # Warmup reaches the peak on its last step, so step 0 already learns a little.
  return optax.join_schedules(
      [optax.linear_schedule(peak / warmup, peak, warmup - 1) if warmup > 1 else optax.constant_schedule(peak), decay],
      [warmup],
  )


def _stable_then_decay(optim_config: Any, peak: float, alpha: float, steps: int) -> optax.Schedule:
  """The peak for the first 1 - decay_ratio of `steps`, then a cosine down to alpha * peak: a run
  learns at the full rate until its last stretch, where cosine has already halved it by the
  middle of the run."""
  ratio = float(optim_config.decay_ratio)
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"config key optim.decay_ratio={ratio} must be in (0, 1]")
  tail = max(int(round(ratio * steps)), 1)
  if tail >= steps:
    return optax.cosine_decay_schedule(peak, steps, alpha=alpha)
  return optax.join_schedules(
      [optax.constant_schedule(peak), optax.cosine_decay_schedule(peak, tail, alpha=alpha)], [steps - tail]
  )


def weight_decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embeddings); False for norm scales and biases."""

  def decays(path, _):
    return sharding.path_names(path)[-1] not in NO_DECAY_LEAVES

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_config, num_steps)
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
  parts.append(
      optax.adamw(
          learning_rate=schedule,
          b1=float(optim_config.b1),
          b2=float(optim_config.b2),
          eps=float(optim_config.eps),
          weight_decay=float(optim_config.weight_decay),
          mask=weight_decay_mask,
      )
  )
  return optax.chain(*parts), schedule
