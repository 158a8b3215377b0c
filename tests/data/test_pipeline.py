"""The Grain pipeline: truncation policies, packing, epochs, mixtures, host sharding and
exact iterator restore (in-process and with worker processes)."""

import collections
import json
import multiprocessing
import os
import signal
import time

import grain
import jax
import numpy as np
import pytest

from cftjax import objectives
from cftjax.data import pipeline
from cftjax.data.batch import TokenBatch
from cftjax.data import sources as sources_lib
from configs import base

NUM_TRAIN = 40  # small, and odd halves would also work: shards may differ by one


def data_config(data_dir, **changes):
  config = base.get_config().data
  config.data_dir = str(data_dir)
  config.update_from_flattened_dict(
      {
          "demo.num_train": NUM_TRAIN,
          "demo.max_steps": 3,  # three-step critiques fit a 512-token row
          "demo.num_validation": 8,
          "demo.num_test": 8,
          "max_length": 512,
          "mixture": "demo_cft:1",
          "chat_template": "plain",
          **changes,
      }
  )
  return config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """(data_dir, tokenizer path, prepared demo data) built once for this module."""
  data_dir = tmp_path_factory.mktemp("demo_data")
  config = data_config(data_dir)
  prepared = sources_lib.prepare(config)
  return data_dir, sources_lib.tokenizer_path(config, prepared), prepared


def build(demo, rows=2, train=True, process_index=0, process_count=1, **changes):
  data_dir, tokenizer, _ = demo
  config = data_config(data_dir, **changes)
  sources = sources_lib.load_sources(config, "train")
  return pipeline.make_dataset(
      config, sources, tokenizer, rows=rows, train=train, process_index=process_index, process_count=process_count
  )


def segments(batch) -> list[tuple]:
  """Every packed example of a batch as (inputs, targets, weights, source id) tuples."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    seg = batch["inputs_segment_ids"][row]
    for sid in range(1, int(seg.max()) + 1):
      at = seg == sid
      out.append(
          (
              tuple(batch["inputs"][row][at]),
              tuple(batch["targets"][row][at]),
              tuple(batch["weights"][row][at]),
              int(batch["source_ids"][row][at][0]),
          )
      )
  return out


def encoded(demo, objective="cft", source_id=0, max_length=512, truncation="truncate_prompt_left") -> list[tuple]:
  _, tokenizer, prepared = demo
  encode = pipeline.EncodeExample(tokenizer, "plain", max_length, truncation)
  out = []
  for record in prepared.records("train", objective):
    ex = encode((source_id, record))
    out.append((tuple(ex["inputs"]), tuple(ex["targets"]), tuple(ex["weights"]), source_id))
  return out


# ------------------------------------------------------------------------------ truncation
PROMPT, TARGET = list(range(100, 110)), list(range(200, 205))
IDS, MASK = PROMPT + TARGET, [0] * 10 + [1] * 5


def test_truncate_keeps_what_fits():
  assert pipeline.truncate(IDS, MASK, 15, "drop") == (IDS, MASK, pipeline.KEPT)


def test_truncate_drop():
  assert pipeline.truncate(IDS, MASK, 14, "drop") == ([], [], pipeline.DROPPED)


def test_truncate_prompt_left_keeps_the_whole_target():
  ids, mask, outcome = pipeline.truncate(IDS, MASK, 8, "truncate_prompt_left")
  assert (ids, mask, outcome) == (PROMPT[-3:] + TARGET, [0] * 3 + [1] * 5, pipeline.PROMPT_CUT)


def test_truncate_prompt_left_with_a_target_longer_than_the_row_cuts_the_target():
  ids, mask, outcome = pipeline.truncate(IDS, MASK, 4, "truncate_prompt_left")
  assert (ids, mask, outcome) == (PROMPT[-1:] + TARGET[:3], [0, 1, 1, 1], pipeline.TARGET_CUT)


def test_truncate_target_cuts_its_tail():
  ids, mask, outcome = pipeline.truncate(IDS, MASK, 12, "truncate_target")
  assert (ids, mask, outcome) == (PROMPT + TARGET[:2], [0] * 10 + [1] * 2, pipeline.TARGET_CUT)


def test_truncate_target_drops_when_only_the_prompt_fits():
  assert pipeline.truncate(IDS, MASK, 10, "truncate_target") == ([], [], pipeline.DROPPED)


def test_unknown_truncation_policy_names_the_key(demo):
  with pytest.raises(ValueError, match="data.truncation='cut'"):
    build(demo, truncation="cut")


@pytest.mark.parametrize("key", ["read_threads", "read_buffer_size", "worker_count", "packing_window"])
def test_negative_pipeline_sizes_name_the_key(demo, key):
  with pytest.raises(ValueError, match=f"data.{key}=-1"):
    build(demo, **{key: -1})


def test_encode_drop_leaves_a_counted_zero_weight_placeholder(demo):
  _, tokenizer, prepared = demo
  record = prepared.records("train", "cft")[0]
  ex = pipeline.EncodeExample(tokenizer, "plain", 32, "drop")((0, record))
  assert len(ex["inputs"]) == 1 and ex["weights"].tolist() == [0.0]
  assert ex["stats"].tolist() == [pipeline.DROPPED]


def test_encode_prompt_left_keeps_the_target_tokens(demo):
  _, tokenizer, prepared = demo
  record = prepared.records("train", "cft")[0]
  full = pipeline.EncodeExample(tokenizer, "plain", 4096, "truncate_prompt_left")((0, record))
  target_len = int(full["weights"].sum())
  cut = pipeline.EncodeExample(tokenizer, "plain", target_len + 8, "truncate_prompt_left")((0, record))
  assert cut["stats"].tolist() == [pipeline.PROMPT_CUT]
  assert len(cut["inputs"]) == target_len + 8
  assert cut["targets"][cut["weights"] > 0].tolist() == full["targets"][full["weights"] > 0].tolist()


def test_encode_target_cut_keeps_the_prompt(demo):
  _, tokenizer, prepared = demo
  record = prepared.records("train", "cft")[0]
  full = pipeline.EncodeExample(tokenizer, "plain", 4096, "truncate_target")((0, record))
  prompt_len = int(np.argmax(full["weights"] > 0))
  cut = pipeline.EncodeExample(tokenizer, "plain", prompt_len + 5, "truncate_target")((0, record))
  assert cut["stats"].tolist() == [pipeline.TARGET_CUT]
  assert cut["inputs"].tolist() == full["inputs"][: prompt_len + 5].tolist()
  assert 0 < cut["weights"].sum() < full["weights"].sum()


# ------------------------------------------------------------------------------ packing
def test_packing_restarts_positions_per_example_and_loses_nothing(demo):
  batches = list(build(demo, rows=3, mixture="demo_cft:1,demo_sft:1"))
  packed = [ex for b in batches for ex in segments(b)]
  # One epoch of a two-source mixture of equal sizes: every example once, none twice.
  expected = encoded(demo, "cft", 0) + encoded(demo, "sft", 1)
  assert collections.Counter(packed) == collections.Counter(expected)
  assert max(int(b["inputs_segment_ids"].max()) for b in batches) > 1  # rows do hold several examples

  for b in batches:
    assert b["inputs"].shape[1] == 512
    for row in range(b["inputs"].shape[0]):
      seg, pos = b["inputs_segment_ids"][row], b["inputs_positions"][row]
      used = seg > 0
      # Segments are 1..k, contiguous from the row start; padding (0) comes last.
      assert used[: used.sum()].all() and not used[used.sum() :].any()
      assert np.all(np.diff(seg[used]) >= 0) and set(seg[used]) == set(range(1, int(seg.max()) + 1))
      for sid in range(1, int(seg.max()) + 1):
        assert pos[seg == sid].tolist() == list(range(int(np.sum(seg == sid))))
      assert not b["weights"][row][~used].any() and not pos[~used].any()
      # Each packed example leaves one outcome code in the row's stats.
      assert int(np.sum(b["stats"][row] > 0)) == int(seg.max())
  stats = [pipeline.batch_stats(b) for b in batches]
  assert sum(s["examples"] for s in stats) == 2 * NUM_TRAIN
  assert sum(s["kept"] for s in stats) == 2 * NUM_TRAIN  # max_length 512 fits every demo example
  nonpad = sum(s["nonpad_fraction"] for s in stats) / len(stats)
  assert 0.5 < nonpad <= 1.0


def test_truncation_outcomes_are_counted_per_batch(demo):
  # 120 tokens: every CFT example (150+) is too long; many SFT ones fit.
  batches = list(build(demo, rows=4, max_length=120, truncation="drop", mixture="demo_cft:1,demo_sft:1"))
  stats = [pipeline.batch_stats(b) for b in batches]
  assert sum(s["examples"] for s in stats) == 2 * NUM_TRAIN  # dropped ones are still counted
  assert sum(s["dropped"] for s in stats) >= NUM_TRAIN
  assert sum(s["kept"] for s in stats) + sum(s["dropped"] for s in stats) == 2 * NUM_TRAIN
  # A dropped example trains nothing: all its weight is zero.
  kept_weight = sum(float(b["weights"].sum()) for b in batches)
  expected = sum(sum(w) for _, _, w, _ in encoded(demo, "sft", max_length=120, truncation="drop"))
  assert kept_weight == expected


def test_unpacked_rows_hold_one_example(demo):
  batches = list(build(demo, rows=4, packing=False))
  assert sum(len(segments(b)) for b in batches) == NUM_TRAIN
  assert all(int(b["inputs_segment_ids"].max()) == 1 for b in batches)


def test_epochs_repeat_every_example_in_a_new_order(demo):
  unpacked = [ex for b in build(demo, rows=1, packing=False, num_epochs=2) for ex in segments(b)]
  first, second = unpacked[:NUM_TRAIN], unpacked[NUM_TRAIN:]
  assert collections.Counter(first) == collections.Counter(second) == collections.Counter(encoded(demo))
  assert first != second


def test_validation_is_one_unshuffled_pass(demo):
  data_dir, tokenizer, prepared = demo
  config = data_config(data_dir, num_epochs=3)
  ds = pipeline.make_dataset(config, sources_lib.load_sources(config, "validation"), tokenizer, rows=2, train=False)
  queries = [ex[0] for b in ds for ex in segments(b)]
  assert len(queries) == 8


def test_pad_rows_and_the_token_batch(demo):
  batch = next(iter(build(demo, rows=2)))
  padded = pipeline.pad_rows({k: v[:1] for k, v in batch.items()}, 2)
  assert all(v.shape[0] == 2 for v in padded.values())
  assert not padded["weights"][1].any() and not padded["inputs_segment_ids"][1].any()
  tokens = TokenBatch.from_packed(batch)
  np.testing.assert_array_equal(tokens.positions, batch["inputs_positions"])
  np.testing.assert_array_equal(tokens.segment_ids, batch["inputs_segment_ids"])
  for name in ("inputs", "targets", "weights", "objective_ids", "source_ids"):
    np.testing.assert_array_equal(getattr(tokens, name), batch[name])
    assert getattr(tokens, name).dtype == TokenBatch.dtype(name)
  assert len(jax.tree.leaves(tokens)) == len(TokenBatch.fields()) == 7


# ------------------------------------------------------------------------------ iterator state
def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for i, (a, b) in enumerate(zip(got, want)):
    assert a.keys() == b.keys()
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {i}, {key}")


def test_iterator_state_round_trip_is_exact(demo):
  # Windows of 8 examples (~4 rows): the batches after the saved state cross several.
  dataset = build(demo, rows=2, mixture="demo_cft:1,demo_sft:1", num_epochs=2, packing_window=8)
  iterator = iter(dataset)
  take(iterator, 5)
  state = iterator.get_state()
  json.dumps(state)  # what Orbax writes
  expected = take(iterator, 8)
  restored = iter(dataset)
  restored.set_state(state)
  assert_same_batches(take(restored, 8), expected)


def test_resume_with_worker_processes_yields_the_uninterrupted_batches(demo):
  dataset = build(demo, rows=2, worker_count=2, num_epochs=2, packing_window=8)
  iterator = iter(dataset)
  try:
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 6)
  finally:
    iterator.close()
  restored = iter(dataset)
  try:
    restored.set_state(state)
    got = take(restored, 2)
    # Ctrl-C reaches the workers too; they leave it to the main process and keep going.
    workers = multiprocessing.active_children()
    assert len(workers) >= 2
    for worker in workers:
      os.kill(worker.pid, signal.SIGINT)
      os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    got += take(restored, 4)
  finally:
    restored.close()
  assert_same_batches(got, expected)
  # Workers change where examples are encoded, not what the batches hold.
  in_process = iter(build(demo, rows=2, worker_count=0, num_epochs=2, packing_window=8))
  take(in_process, 3)
  assert_same_batches(got, take(in_process, 6))


# ------------------------------------------------------------------------------ mixtures, hosts
def test_mixture_weights_are_respected(demo):
  data_dir, _, _ = demo
  config = data_config(data_dir, mixture="demo_cft:3,demo_sft:1")
  sources = sources_lib.load_sources(config, "train")
  ds = pipeline.record_dataset(sources, seed=0, num_epochs=None, shuffle=True, process_index=0, process_count=1)
  picks = [ds[i][0] for i in range(400)]
  share = picks.count(0) / len(picks)
  assert share == pytest.approx(0.75, abs=0.05)
  # Each token carries its source and objective, for per-source and per-objective metrics.
  batch = next(iter(build(demo, rows=4, mixture="demo_cft:3,demo_sft:1")))
  used = batch["weights"] > 0
  assert set(np.unique(batch["source_ids"][used])) <= {0, 1}
  sft_id, cft_id = objectives.OBJECTIVES.index("sft"), objectives.OBJECTIVES.index("cft")
  assert np.array_equal(batch["objective_ids"][used] == cft_id, batch["source_ids"][used] == 0)
  assert np.array_equal(batch["objective_ids"][used] == sft_id, batch["source_ids"][used] == 1)


@pytest.mark.parametrize("num_train_used", [NUM_TRAIN, NUM_TRAIN - 1])
def test_hosts_read_disjoint_examples_that_cover_the_split(demo, num_train_used):
  data_dir, _, prepared = demo
  records = prepared.records("train", "cft")[:num_train_used]
  source = sources_lib.Source("demo_cft", 1.0, records)
  per_host = []
  for host in range(2):
    ds = pipeline.record_dataset([source], seed=0, num_epochs=1, shuffle=True, process_index=host, process_count=2)
    per_host.append([json.dumps(ds[i][1], sort_keys=True) for i in range(len(ds))])
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == sorted(json.dumps(r, sort_keys=True) for r in records)
  # The full pipeline too: each host's packed examples are its own shard's.
  packed = [{ex for b in build(demo, rows=2, process_index=h, process_count=2) for ex in segments(b)} for h in range(2)]
  assert not packed[0] & packed[1]
  assert packed[0] | packed[1] == set(encoded(demo))


def test_packing_window_does_not_hold_worker_shared_memory(demo):
  """Arrays from worker processes arrive in shared memory, one open file each; a packing
  window buffers many examples, so it must keep copies, not the shared arrays."""
  open_files = lambda: len(os.listdir("/proc/self/fd"))
  iterator = iter(build(demo, rows=2, worker_count=1, num_epochs=4, packing_window=64))
  try:
    next(iterator)
    before = open_files()
    take(iterator, 10)  # reads ahead into the next window
    assert open_files() - before < 50  # 64 buffered examples x 6 features if shared
  finally:
    iterator.close()
