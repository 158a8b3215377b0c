"""SFT/CFT formatting, the loss mask, and the masked token-mean cross entropy.

The tokenizer is the demo's kind: a SentencePiece model trained here on a tiny corpus
(`train_sentencepiece`), used through the same path the input pipeline takes
(`pipeline.EncodeExample`: ids -> inputs / targets / weights).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cftjax import objectives
from cftjax.data import pipeline
from cftjax.data.tokenizer import load_tokenizer, train_sentencepiece

CORPUS = [
    "Please critique whether the following solution to the question is correct.",
    "Question:\nStart with 14. Add 24, then subtract 11. What is the result?",
    "Solution:\nStep 1: 14 + 24 = 38\nStep 2: 38 - 11 = 27\nThe answer is 27.",
    "Critique:\nStep 1: 14 + 24 = 38 is correct.\nStep 2: 38 - 11 = 28 is wrong; it should be 27.",
    "The correct final answer is 27.\nConclusion: wrong",
    "You are a careful tutor. Let x be a number.",
] * 4


def cft_record(
    query="Start with 14. Add 24, then subtract 11. What is the result?",
    response="Step 1: 14 + 24 = 38\nStep 2: 38 - 11 = 28\nThe answer is 28.",
    critique="Step 1: 14 + 24 = 38 is correct.\nStep 2: 38 - 11 = 28 is wrong; it should be 27.\n"
    "The correct final answer is 27.\nConclusion: wrong",
    **extra,
):
  record = {
      "objective": "cft",
      "query": query,
      "response": response,
      "critique": critique,
      "system": "",
      "history": "[]",
      "answer": "27",
      "label": "wrong",
  }
  record.update(extra)
  return record


def sft_record(
    query="Start with 3. Add 4. What is the result?", response="Step 1: 3 + 4 = 7\nThe answer is 7.", **extra
):
  record = {
      "objective": "sft",
      "query": query,
      "response": response,
      "critique": "",
      "system": "",
      "history": "[]",
      "answer": "7",
      "label": "",
  }
  record.update(extra)
  return record


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  return str(train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "demo", vocab_size=320))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
  return load_tokenizer(tokenizer_path)


# One compile per input shape instead of one per eager op.
loss_sums = jax.jit(objectives.loss_sums, static_argnames="num_sources")


def target_ids(ids, mask):
  return [i for i, m in zip(ids, mask) if m]


# ------------------------------------------------------------------------------ formatting
def test_cft_user_turn_is_the_papers_exact_format():
  text = objectives.cft_user_text("What is 2 + 2?", "2 + 2 = 5")
  assert text == (
      "Please critique whether the following solution to the question is correct.\n"
      "Question:\nWhat is 2 + 2?\n\nSolution:\n2 + 2 = 5"
  )
  conversation = objectives.to_conversation(cft_record(query="Q?", response="R.", critique="C.\nConclusion: right"))
  assert [t.role for t in conversation.context] == ["user"]
  assert conversation.context[0].content == objectives.cft_user_text("Q?", "R.")
  assert conversation.reply == "Critique:\nC.\nConclusion: right"


def test_system_and_history_are_context_not_target():
  history = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
  conversation = objectives.to_conversation(sft_record(system="Be brief.", history=history))
  assert [(t.role, t.content) for t in conversation.context] == [
      ("system", "Be brief."),
      ("user", "Hi"),
      ("assistant", "Hello"),
      ("user", "Start with 3. Add 4. What is the result?"),
  ]
  assert conversation.reply == "Step 1: 3 + 4 = 7\nThe answer is 7."


@pytest.mark.parametrize(
    "record, message",
    [
        (sft_record(objective="rl"), "line 7: field 'objective' is 'rl'"),
        (sft_record(history="[{"), "line 7: field 'history' is not valid JSON"),
        (sft_record(history='[{"role": "user"}]'), "line 7: history turn 0 needs 'role' and 'content'"),
    ],
)
def test_bad_records_fail_naming_where_and_the_field(record, message):
  with pytest.raises(ValueError, match=message):
    objectives.to_conversation(record, where="train.jsonl line 7")


def test_objective_ids():
  assert [objectives.objective_id(name) for name in ("sft", "cft")] == [0, 1]
  with pytest.raises(ValueError, match="objective 'dpo' is not one of"):
    objectives.objective_id("dpo")


# ------------------------------------------------------------------------------ loss mask
def test_cft_mask_covers_exactly_the_critique_tokens_and_eos(tokenizer):
  record = cft_record()
  ids, mask = objectives.encode_example(record, tokenizer, "plain")
  assert len(ids) == len(mask) and set(mask) == {0, 1}
  critique_ids = tokenizer.encode("Critique:\n" + record["critique"])
  assert target_ids(ids, mask) == critique_ids + [tokenizer.eos_id]
  assert sum(mask) == len(critique_ids) + 1
  first = mask.index(1)
  assert mask[first:] == [1] * (len(ids) - first)  # one contiguous span at the end
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  prompt = tokenizer.decode(ids[:first])
  assert prompt == objectives.cft_user_text(record["query"], record["response"]) + "\n"


def test_sft_mask_covers_exactly_the_response_tokens_and_eos(tokenizer):
  record = sft_record()
  ids, mask = objectives.encode_example(record, tokenizer, "plain")
  assert target_ids(ids, mask) == tokenizer.encode(record["response"]) + [tokenizer.eos_id]
  assert tokenizer.decode(ids[: mask.index(1)]) == record["query"] + "\n"


@pytest.mark.parametrize("template", ["plain", "qwen"])
def test_changing_prompt_or_noisy_response_changes_no_target(tokenizer_path, template):
  encode = pipeline.EncodeExample(tokenizer_path, template, max_length=512, truncation="truncate_prompt_left")
  base = encode((0, cft_record()))
  variants = [
      cft_record(query="Start with 9. Multiply by 3. What is the result?"),
      cft_record(response="Step 1: 14 + 24 = 38\nThe answer is 38."),
      cft_record(response="x" * 40, query="", system="You are a careful tutor."),
      cft_record(
          history=json.dumps(
              [{"role": "user", "content": "Let x be a number."}, {"role": "assistant", "content": "Step 1:"}]
          )
      ),
  ]
  for record in variants:
    other = encode((0, record))
    assert not np.array_equal(other["inputs"][: len(base["inputs"])], base["inputs"][: len(other["inputs"])])
    # The tail holds the targets: same target tokens, same weights, whatever the prompt.
    for key in ("targets", "weights"):
      tail = int(base["weights"].sum()) + 1
      np.testing.assert_array_equal(other[key][-tail:], base[key][-tail:], err_msg=key)
    assert other["weights"].sum() == base["weights"].sum()
    np.testing.assert_array_equal(other["targets"][other["weights"] == 1], base["targets"][base["weights"] == 1])
  # Weights sit on the targets, shifted by one from the ids: the first weighted target is
  # the first critique token, the last is the end token.
  weighted = base["targets"][base["weights"] == 1]
  tokenizer = load_tokenizer(tokenizer_path)
  end = tokenizer.eos_id if template == "plain" else tokenizer.token_to_id("<|im_end|>")
  assert weighted[-1] == end
  assert tokenizer.decode(weighted.tolist()).startswith("Critique:\n")


def test_changing_the_critique_changes_only_targets(tokenizer):
  ids_a, mask_a = objectives.encode_example(cft_record(), tokenizer, "plain")
  ids_b, mask_b = objectives.encode_example(
      cft_record(critique="All steps are correct.\nConclusion: right"), tokenizer, "plain"
  )
  first_a, first_b = mask_a.index(1), mask_b.index(1)
  assert first_a == first_b and ids_a[:first_a] == ids_b[:first_b]


# ------------------------------------------------------------------------------ loss
def numpy_cross_entropy(logits, targets):
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def loss_case():
  rng = np.random.default_rng(0)
  batch, length, vocab, num_sources = 3, 7, 11, 3
  case = {
      "logits": (3 * rng.standard_normal((batch, length, vocab))).astype(np.float32),
      "targets": rng.integers(0, vocab, (batch, length)).astype(np.int32),
      # Rows with 7, 2 and 0 target tokens: a mean of row means would differ.
      "weights": np.array([[1] * 7, [0, 0, 1, 1, 0, 0, 0], [0] * 7], np.float32),
      "objective_ids": np.array([[1] * 7, [0, 0, 0, 0, 1, 1, 1], [1] * 7], np.int32),
      "source_ids": np.array([[0] * 4 + [2] * 3, [1] * 7, [0] * 7], np.int32),
      "num_sources": num_sources,
  }
  sums = loss_sums(
      case["logits"],
      case["targets"],
      case["weights"],
      case["objective_ids"],
      case["source_ids"],
      num_sources=num_sources,
  )
  case["sums"] = jax.device_get(sums)
  case["means"] = jax.device_get(objectives.mean_losses(sums))
  case["ce"] = numpy_cross_entropy(case["logits"].astype(np.float64), case["targets"])
  return case


def test_token_cross_entropy_matches_numpy(loss_case):
  got = jax.jit(objectives.token_cross_entropy)(loss_case["logits"], loss_case["targets"])
  np.testing.assert_allclose(got, loss_case["ce"], rtol=1e-5, atol=1e-5)


def test_loss_is_the_token_mean_over_the_batch(loss_case):
  ce, w = loss_case["ce"], loss_case["weights"]
  want = (ce * w).sum() / w.sum()  # 9 tokens: 7 from row 0, 2 from row 1
  np.testing.assert_allclose(loss_case["means"]["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(loss_case["sums"]["loss_sum"], (ce * w).sum(), rtol=1e-5)
  assert loss_case["sums"]["weight_sum"] == 9
  mean_of_row_means = np.mean([(ce[r] * w[r]).sum() / w[r].sum() for r in range(2)])
  assert abs(want - mean_of_row_means) > 1e-3  # the case tells the two apart


def test_loss_is_split_by_objective(loss_case):
  ce, w, objective = loss_case["ce"], loss_case["weights"], loss_case["objective_ids"]
  for i, name in enumerate(objectives.OBJECTIVES):
    wi = w * (objective == i)
    assert loss_case["sums"][f"weight_sum_{name}"] == wi.sum()
    assert loss_case["means"][f"tokens_{name}"] == wi.sum()
    np.testing.assert_allclose(loss_case["means"][f"loss_{name}"], (ce * wi).sum() / wi.sum(), rtol=1e-5)
  # Only target tokens count: row 1's sft tokens are positions 2 and 3 (positions 4-6 have weight 0).
  assert loss_case["sums"]["weight_sum_sft"] == 2


def test_loss_is_split_by_source(loss_case):
  ce, w, source = loss_case["ce"], loss_case["weights"], loss_case["source_ids"]
  want_sums = [(ce * w * (source == s)).sum() for s in range(loss_case["num_sources"])]
  want_counts = [(w * (source == s)).sum() for s in range(loss_case["num_sources"])]
  np.testing.assert_allclose(loss_case["sums"]["loss_sum_by_source"], want_sums, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(loss_case["sums"]["weight_sum_by_source"], want_counts)
  assert want_counts == [4, 2, 3]
  np.testing.assert_allclose(
      loss_case["means"]["loss_by_source"], np.array(want_sums) / np.array(want_counts), rtol=1e-5
  )


def test_an_absent_objective_reports_zero_not_nan():
  logits = jnp.zeros((1, 3, 5))
  targets = jnp.zeros((1, 3), jnp.int32)
  sums = loss_sums(logits, targets, jnp.ones((1, 3)), jnp.ones((1, 3), jnp.int32))
  means = objectives.mean_losses(sums)
  assert float(means["loss_sft"]) == 0.0 and float(means["tokens_sft"]) == 0.0
  np.testing.assert_allclose(means["loss_cft"], np.log(5), rtol=1e-6)
  assert "loss_by_source" not in means
  empty = objectives.mean_losses(loss_sums(logits, targets, jnp.zeros((1, 3)), jnp.ones((1, 3), jnp.int32)))
  assert float(empty["loss"]) == 0.0


def test_sums_from_parts_add_up_to_the_whole(loss_case):
  # What accumulation and multi-host runs rely on: sums of parts, divided once.
  parts = [
      loss_sums(
          loss_case["logits"][i : i + 1],
          loss_case["targets"][i : i + 1],
          loss_case["weights"][i : i + 1],
          loss_case["objective_ids"][i : i + 1],
          loss_case["source_ids"][i : i + 1],
          num_sources=loss_case["num_sources"],
      )
      for i in range(3)
  ]
  total = jax.tree.map(lambda *x: np.sum(x, axis=0), *jax.device_get(parts))
  means = objectives.mean_losses(total)
  np.testing.assert_allclose(means["loss"], loss_case["means"]["loss"], rtol=1e-6)
  np.testing.assert_allclose(means["loss_by_source"], loss_case["means"]["loss_by_source"], rtol=1e-6)
