"""SFT and CFT: examples -> conversations -> token ids + loss mask; masked cross entropy.

SFT learns P(response | query); CFT learns P(critique | query, noisy response), in the CFT
paper's prompt format. Either way the loss mask is 1 exactly on the target tokens.
"""

import json

import jax
import jax.numpy as jnp

from cftjax import chat_templates
from cftjax.chat_templates import Conversation, Turn

OBJECTIVES = ("sft", "cft")  # index = objective id carried per token
CFT_INSTRUCTION = "Please critique whether the following solution to the question is correct."


def cft_input_text(query: str, response: str) -> str:
  """The "input" field of a WebInstruct-CFT row."""
  return f"Question:\n{query}\n\nSolution:\n{response}"


def cft_user_text(query: str, response: str) -> str:
  """The paper's user turn: instruction + "\n" + input."""
  return f"{CFT_INSTRUCTION}\n{cft_input_text(query, response)}"


def cft_target_text(critique: str) -> str:
  return f"Critique:\n{critique}"


def objective_id(name: str) -> int:
  if name not in OBJECTIVES:
    raise ValueError(f"objective {name!r} is not one of {OBJECTIVES}")
  return OBJECTIVES.index(name)


def to_conversation(record: dict, where: str = "record") -> Conversation:
  """Canonical record (see cftjax.data.records) -> conversation with the target reply."""
  objective = record.get("objective")
  context: list[Turn] = []
  if record.get("system"):
    context.append(Turn("system", record["system"]))
  history = record.get("history") or "[]"
  try:
    turns = json.loads(history)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: field 'history' is not valid JSON: {e}") from e
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
      raise ValueError(f"{where}: history turn {i} needs 'role' and 'content'")
    context.append(Turn(turn["role"], turn["content"]))
  if objective == "sft":
    context.append(Turn("user", record["query"]))
    return Conversation(tuple(context), record["response"])
  if objective == "cft":
    context.append(Turn("user", cft_user_text(record["query"], record["response"])))
    return Conversation(tuple(context), cft_target_text(record["critique"]))
  raise ValueError(f"{where}: field 'objective' is {objective!r}, expected one of {OBJECTIVES}")


def encode_example(
    record: dict, tokenizer, template: str, default_system: str | None = None, where: str = "record"
) -> tuple[list[int], list[int]]:
  """Token ids and loss mask (1 on target tokens and the closing end token)."""
  return chat_templates.encode(to_conversation(record, where), template, tokenizer, default_system)


# ------------------------------------------------------------------------------ loss
def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token cross entropy in float32."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return log_normalizer - target_logits


def loss_sums(
    logits_BxLxV: jax.Array,
    targets_BxL: jax.Array,
    weights_BxL: jax.Array,
    objective_ids_BxL: jax.Array,
    source_ids_BxL: jax.Array | None = None,
    num_sources: int = 0,
) -> dict[str, jax.Array]:
  """Sums (not means) of masked loss and weight, overall and per objective.

  Returning sums lets callers add micro-batches and hosts before dividing once, which
  is what makes the loss a token mean over the global batch.
  """
  return token_loss_sums(
      token_cross_entropy(logits_BxLxV, targets_BxL), weights_BxL, objective_ids_BxL, source_ids_BxL, num_sources
  )


def token_loss_sums(
    ce_BxL: jax.Array,
    weights_BxL: jax.Array,
    objective_ids_BxL: jax.Array,
    source_ids_BxL: jax.Array | None = None,
    num_sources: int = 0,
) -> dict[str, jax.Array]:
  """`loss_sums` from per-token losses (e.g. the chunked head's, cftjax.head_loss)."""
  ce = ce_BxL
  weights = weights_BxL.astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(ce * weights), "weight_sum": jnp.sum(weights)}
  for i, name in enumerate(OBJECTIVES):
    w = weights * (objective_ids_BxL == i)
    sums[f"loss_sum_{name}"] = jnp.sum(ce * w)
    sums[f"weight_sum_{name}"] = jnp.sum(w)
  if num_sources:
    sums["loss_sum_by_source"] = jax.ops.segment_sum((ce * weights).ravel(), source_ids_BxL.ravel(), num_sources)
    sums["weight_sum_by_source"] = jax.ops.segment_sum(weights.ravel(), source_ids_BxL.ravel(), num_sources)
  return sums


def mean_losses(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Token means from sums; an objective absent from the batch reports NaN-free 0."""
  out = {"loss": sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)}
  for name in OBJECTIVES:
    out[f"loss_{name}"] = sums[f"loss_sum_{name}"] / jnp.maximum(sums[f"weight_sum_{name}"], 1.0)
    out[f"tokens_{name}"] = sums[f"weight_sum_{name}"]
  if "loss_sum_by_source" in sums:
    out["loss_by_source"] = sums["loss_sum_by_source"] / jnp.maximum(sums["weight_sum_by_source"], 1.0)
  return out
