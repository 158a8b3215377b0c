"""Memory of the lm-head + cross entropy, whole logits vs chunked (cftjax.head_loss).

Compiles loss and gradients (w.r.t. hidden states and the head) ahead of time for each
vocabulary and length and prints XLA's temporary bytes: what the loss adds on top of the
model, per device, for `--rows` rows. Nothing is allocated, so the 152k-vocab cases
compile on a laptop.

  python scripts/bench_loss_memory.py [--rows=2] [--hidden=3584] [--chunk=256] [--dtype=bfloat16]
"""

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
from absl import app, flags

from cftjax import head_loss, objectives

flags.DEFINE_integer("rows", 2, "Rows per device.")
flags.DEFINE_integer("hidden", 3584, "Hidden size (Qwen2.5-7B: 3584).")
flags.DEFINE_integer("chunk", 256, "model.loss_chunk_size for the chunked path.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the head matmul.")
flags.DEFINE_list("vocab", ["32000", "152064"], "Vocabulary sizes.")
flags.DEFINE_list("length", ["2048", "4096"], "Sequence lengths.")
FLAGS = flags.FLAGS


def full_loss(hidden, kernel, targets, weights, dtype):
  logits = jnp.einsum("bld,dv->blv", hidden.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
  return jnp.sum(objectives.token_cross_entropy(logits, targets) * weights)


def chunked_loss(hidden, kernel, targets, weights, dtype, chunk):
  return jnp.sum(head_loss.chunked_token_cross_entropy(hidden, kernel, targets, chunk, dtype) * weights)


def temp_bytes(loss, rows, length, hidden, vocab) -> int:
  args = (
      jax.ShapeDtypeStruct((rows, length, hidden), jnp.float32),
      jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
      jax.ShapeDtypeStruct((rows, length), jnp.int32),
      jax.ShapeDtypeStruct((rows, length), jnp.float32),
  )
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  dtype = jnp.dtype(FLAGS.dtype)
  gib = 1024**3
  print(
      f"loss + grads temporaries per device: {FLAGS.rows} rows, hidden {FLAGS.hidden}, {FLAGS.dtype} matmul, "
      f"chunk {FLAGS.chunk}"
  )
  print("| vocab | length | whole logits | chunked | ratio |")
  print("|---|---|---|---|---|")
  for vocab in map(int, FLAGS.vocab):
    for length in map(int, FLAGS.length):
      full = temp_bytes(functools.partial(full_loss, dtype=dtype), FLAGS.rows, length, FLAGS.hidden, vocab)
      chunked = temp_bytes(
          functools.partial(chunked_loss, dtype=dtype, chunk=FLAGS.chunk), FLAGS.rows, length, FLAGS.hidden, vocab
      )
      print(f"| {vocab} | {length} | {full / gib:.2f} GiB | {chunked / gib:.2f} GiB | {full / chunked:.1f}x |")


if __name__ == "__main__":
  app.run(main)
