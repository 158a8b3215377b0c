"""Input pipeline benchmark: tokens/s with 0, 1 and 2 workers, packing efficiency, and the
ratio of pipeline throughput to what a train step consumes.

  python scripts/bench_pipeline.py [--rows=4000] [--max_length=2048] [--seconds=20]
      [--packing_window=N | --grain_first_fit_bins=N]

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

from cftjax import cli

# Token lengths (median, log-sigma) of each part of a CFT example, after WebInstruct-CFT:
# short questions, longer noisy solutions and critiques. Totals: a few hundred to a couple
# of thousand tokens, median ~1000; the longest few percent exceed 2048 and get cut.
PART_TOKENS = {"query": (120, 0.7), "response": (400, 0.6), "critique": (350, 0.6)}


def pseudo_words(count: int, seed: int = 0) -> list[str]:
  """Letter-only words: the tokenizer splits digits one by one, which would make lengths
  depend on the spelling of made-up numbers rather than on the distribution above."""
  rng = np.random.default_rng(seed)
  syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
  return ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(count)]


def synthetic_corpus(path: Path, rows: int, words: list[str], tokens_per_word: float, seed: int = 0) -> None:
  """Word-salad CFT triples whose parts have the log-normal token lengths of PART_TOKENS."""
  rng = np.random.default_rng(seed)

  def text(median_tokens: float, sigma: float) -> str:
    tokens = rng.lognormal(np.log(median_tokens), sigma)
    return " ".join(rng.choice(words, max(3, int(tokens / tokens_per_word))))

  with open(path, "w") as f:
    for _ in range(rows):
      row = {part: text(*PART_TOKENS[part]) for part in PART_TOKENS}
      row["critique"] += "\nConclusion: wrong"
      f.write(json.dumps(row) + "\n")


def example_lengths(data_config, sources, tokenizer_path: str, count: int = 1000) -> np.ndarray:
  """Token lengths of the first examples as the pipeline encodes them (before truncation)."""
  from cftjax.data import pipeline

  encode = pipeline.EncodeExample(tokenizer_path, data_config.chat_template, 1 << 30, data_config.truncation)
  records = sources[0].records
  return np.array([len(encode((0, records[i]))["inputs"]) for i in range(min(count, len(records)))])


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


def use_grain_first_fit(bins: int) -> None:
  """Swaps the trainer's packer for grain's online first-fit packer (the baseline)."""
  import grain
  from cftjax.data import pipeline

  def pack_and_batch(ds, *, max_length, rows, packing, window, seed):
    del packing, window
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={k: max_length for k in (*pipeline.TOKEN_FEATURES, "stats")},
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=True,
        meta_features=("targets", "weights", "objective_ids", "source_ids", "stats"),
    )
    return ds.batch(rows, drop_remainder=False)

  pipeline.pack_and_batch = pack_and_batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=4000)
  parser.add_argument("--max_length", type=int, default=2048)
  parser.add_argument("--batch_rows", type=int, default=8)
  parser.add_argument("--packing_window", type=int, default=None, help="default: the config's")
  parser.add_argument(
      "--grain_first_fit_bins",
      type=int,
      default=0,
      help="baseline: pack with grain's FirstFitPackIterDataset and this many bins instead",
  )
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--verbose", action="store_true", help="full traceback of user errors")
  args = parser.parse_args()

  from absl import logging
  import ml_collections

  logging.set_verbosity(logging.WARNING)
  from configs import base
  from cftjax.data import sources as sources_lib, tfds_builder
  from cftjax.data.tokenizer import load_tokenizer, train_sentencepiece

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    words = pseudo_words(3000)
    rng = np.random.default_rng(1)
    sample = [" ".join(rng.choice(words, 200)) for _ in range(500)]
    tokenizer = train_sentencepiece(sample, tmp / "tok", 4000)
    tokens_per_word = len(load_tokenizer(str(tokenizer)).encode(sample[0])) / 200
    corpus = tmp / "corpus.jsonl"
    synthetic_corpus(corpus, args.rows, words, tokens_per_word)
    tfds_builder.build_dataset([str(corpus)], "triples", "bench_cft", tmp / "data", validation_fraction=0.01)

    config = base.get_config()
    data = config.data
    data.source, data.data_dir, data.mixture = "tfds", str(tmp / "data"), "bench_cft:1.0"
    data.tokenizer, data.max_length = str(tokenizer), args.max_length
    data.num_epochs = 1000  # never run dry while timing
    data.packing_window = args.packing_window or data.packing_window
    if args.grain_first_fit_bins:
      use_grain_first_fit(args.grain_first_fit_bins)
    sources = sources_lib.load_sources(data, "train")
    lengths = example_lengths(data, sources, data.tokenizer)
    p10, p50, p90, p99 = np.percentile(lengths, [10, 50, 90, 99]).astype(int)
    print(
        f"example tokens: p10 {p10}, median {p50}, p90 {p90}, p99 {p99}; "
        f"{np.mean(lengths > args.max_length):.1%} longer than {args.max_length} (cut)",
        flush=True,
    )
    results = {}
    for workers in (int(w) for w in args.workers.split(",")):
      data.worker_count = workers
      results[workers] = measure(data, sources, data.tokenizer, args.batch_rows, args.seconds)
      r = results[workers]
      print(
          f"workers={workers}: {r['tokens_per_second']:,.0f} tokens/s, packing efficiency "
          f"{r['packing_efficiency']:.1%} at length {args.max_length} ({r['batches']} batches)",
          flush=True,
      )

  consumed = train_step_tokens_per_second()
  best = max(r["tokens_per_second"] for r in results.values())
  print(f"demo train step consumes {consumed:,.0f} tokens/s; pipeline/train ratio {best / consumed:.1f}x")


if __name__ == "__main__":
  cli.guard(main)
