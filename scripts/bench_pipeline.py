"""Input pipeline benchmark: tokens/s with 0, 1 and 2 workers, packing efficiency, and the
ratio of pipeline throughput to what a train step consumes.

  python scripts/bench_pipeline.py [--rows=4000] [--max_length=2048] [--seconds=20]

Builds a synthetic CFT corpus with a realistic length distribution (prompts and critiques
of a few hundred to a couple of thousand tokens), writes it as a TFDS ArrayRecord dataset
with the project's builder, then times the Grain pipeline the trainer uses.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np


def synthetic_corpus(path: Path, rows: int, seed: int = 0) -> None:
  """Word-salad CFT triples, log-normal lengths: examples of a few hundred to ~2000 tokens."""
  rng = np.random.default_rng(seed)
  vocab = [f"w{i}" for i in range(3000)] + [str(i) for i in range(100)] + ["=", "+", "*", "\\frac{1}{2}"]

  def text(mean_words: float) -> str:
    n = int(np.clip(rng.lognormal(np.log(mean_words), 0.6), 20, 900))
    return " ".join(rng.choice(vocab, n))

  with open(path, "w") as f:
    for _ in range(rows):
      row = {"query": text(60), "response": text(180), "critique": text(150) + "\nConclusion: wrong"}
      f.write(json.dumps(row) + "\n")


def measure(data_config, sources, tokenizer_path, rows_per_batch: int, seconds: float) -> dict:
  from cftjax.data import pipeline

  ds = pipeline.make_dataset(data_config, sources, tokenizer_path, rows=rows_per_batch, train=True)
  it = iter(ds)
  next(it)  # warm up: worker start, tokenizer load
  tokens = nonpad = slots = batches = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    seg = batch["inputs_segment_ids"]
    nonpad += int((seg > 0).sum())
    slots += seg.size
    batches += 1
  elapsed = time.perf_counter() - start
  return {"tokens_per_second": nonpad / elapsed, "packing_efficiency": nonpad / max(slots, 1), "batches": batches}


def train_step_tokens_per_second(steps: int = 6) -> float:
  """Non-pad tokens/s the demo config's train step consumes on this machine."""
  from configs import demo
  from cftjax import train

  config = demo.get_config()
  config.train.num_steps = steps
  config.train.log_every = steps
  config.train.eval_every = 0
  config.checkpoint.every_steps = 10_000
  with tempfile.TemporaryDirectory() as workdir:
    config.data.data_dir = str(Path(workdir) / "data")
    result = train.run(config, workdir)
  return result.last_metrics["tokens_per_second"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=4000)
  parser.add_argument("--max_length", type=int, default=2048)
  parser.add_argument("--batch_rows", type=int, default=8)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--workers", default="0,1,2")
  args = parser.parse_args()

  from absl import logging
  import ml_collections

  logging.set_verbosity(logging.WARNING)
  from configs import base
  from cftjax.data import sources as sources_lib, tfds_builder
  from cftjax.data.tokenizer import train_sentencepiece

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    corpus = tmp / "corpus.jsonl"
    synthetic_corpus(corpus, args.rows)
    tfds_builder.build_dataset([str(corpus)], "triples", "bench_cft", tmp / "data", validation_fraction=0.01)
    lines = (json.loads(l) for l in open(corpus))
    tokenizer = train_sentencepiece((r["response"] for r, _ in zip(lines, range(500))), tmp / "tok", 4000)

    config = base.get_config()
    data = config.data
    data.source, data.data_dir, data.mixture = "tfds", str(tmp / "data"), "bench_cft:1.0"
    data.tokenizer, data.max_length = str(tokenizer), args.max_length
    data.num_epochs = 1000  # never run dry while timing
    sources = sources_lib.load_sources(data, "train")
    results = {}
    for workers in (int(w) for w in args.workers.split(",")):
      data.worker_count = workers
      results[workers] = measure(data, sources, data.tokenizer, args.batch_rows, args.seconds)
      r = results[workers]
      print(f"workers={workers}: {r['tokens_per_second']:,.0f} tokens/s, packing efficiency "
            f"{r['packing_efficiency']:.1%} at length {args.max_length} ({r['batches']} batches)", flush=True)

  consumed = train_step_tokens_per_second()
  best = max(r["tokens_per_second"] for r in results.values())
  print(f"demo train step consumes {consumed:,.0f} tokens/s; pipeline/train ratio {best / consumed:.1f}x")


if __name__ == "__main__":
  main()
