"""Tokenizer interface: SentencePiece demo model and HF tokenizer.json backend."""

import json
import pickle

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from cftjax.data.tokenizer import (
    SP_BOS_ID,
    SP_EOS_ID,
    SP_PAD_ID,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

CORPUS = [
    f"Start with {a}. Add {b}, then multiply by 3. What is the result?\n"
    f"Step 1: {a} + {b} = {a + b}\nStep 2: {a + b} * 3 = {(a + b) * 3}\nThe answer is {(a + b) * 3}."
    for a in range(2, 40)
    for b in range(1, 12)
]
TRICKY_TEXT = "  two leading spaces\nStep 12: 345 * 2 = 690\n\n\tTab, é, 中 and <|im_start|>user\nhi<|im_end|> "


@pytest.fixture(scope="module")
def sp_model_path(tmp_path_factory):
  return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "demo", vocab_size=320)


@pytest.fixture(scope="module")
def sp_tokenizer(sp_model_path):
  return SentencePieceTokenizer(sp_model_path)


def test_sentencepiece_round_trips_newlines_spaces_digits_and_unseen_characters(sp_tokenizer):
  assert isinstance(sp_tokenizer, Tokenizer)
  for text in [*CORPUS[:5], TRICKY_TEXT, "\n", ""]:
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


def test_sentencepiece_splits_numbers_digit_by_digit(sp_tokenizer):
  pieces = [sp_tokenizer.decode([i]) for i in sp_tokenizer.encode("x = 9876 and 105")]
  digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
  assert digit_pieces == list("9876105")


def test_sentencepiece_special_ids_and_markers(sp_tokenizer):
  assert (sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (SP_PAD_ID, SP_BOS_ID, SP_EOS_ID)
  assert sp_tokenizer.stop_ids == (SP_EOS_ID,)
  ids = sp_tokenizer.encode("Step 1")
  assert SP_BOS_ID not in ids and SP_EOS_ID not in ids  # encode adds nothing
  for marker in ("<|im_start|>", "<|im_end|>", "\n"):
    marker_id = sp_tokenizer.token_to_id(marker)
    assert marker_id is not None
    assert sp_tokenizer.encode(marker) == [marker_id]
  assert sp_tokenizer.token_to_id("<|no_such_token|>") is None
  assert sp_tokenizer.decode([SP_BOS_ID, *ids, SP_EOS_ID, SP_PAD_ID]) == "Step 1"  # control ids vanish


def test_sentencepiece_rejects_out_of_range_ids(sp_tokenizer, sp_model_path):
  with pytest.raises(ValueError, match=rf"token id {sp_tokenizer.vocab_size} at position 1.*{sp_model_path}"):
    sp_tokenizer.decode([5, sp_tokenizer.vocab_size])


def test_train_sentencepiece_is_deterministic(tmp_path, sp_model_path):
  again = train_sentencepiece(CORPUS, tmp_path / "again", vocab_size=320)
  assert again.name == "again.model"
  assert again.read_bytes() == sp_model_path.read_bytes()
  assert not list(tmp_path.glob("*.tmp"))


def test_train_sentencepiece_rejects_empty_corpus(tmp_path):
  with pytest.raises(ValueError, match="no non-empty training text"):
    train_sentencepiece(["", ""], tmp_path / "empty", vocab_size=320)


def test_tokenizers_survive_pickling(sp_tokenizer, hf_dir):
  # Grain workers start with spawn and receive the tokenizer pickled.
  for tokenizer in (sp_tokenizer, HFTokenizer(hf_dir / "tokenizer.json")):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(TRICKY_TEXT) == tokenizer.encode(TRICKY_TEXT)
    assert (clone.eos_id, clone.pad_id, clone.bos_id) == (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id)


def _build_hf_tokenizer() -> tokenizers.Tokenizer:
  """A tiny byte-level BPE with Qwen-style chat markers and a BOS-adding post-processor."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(CORPUS[:50], trainer=trainer)
  # Like Llama 3's tokenizer.json: HF would prepend this token unless told not to.
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))]
  )
  return tokenizer


def _write_json(path, content):
  path.write_text(json.dumps(content), encoding="utf-8")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf")
  _build_hf_tokenizer().save(str(directory / "tokenizer.json"))
  _write_json(
      directory / "tokenizer_config.json",
      {"bos_token": None, "eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>"},
  )
  return directory


def test_hf_tokenizer_reads_special_tokens_from_config(hf_dir):
  tokenizer = HFTokenizer(hf_dir / "tokenizer.json")
  assert isinstance(tokenizer, Tokenizer)
  assert tokenizer.bos_id is None
  assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>")
  assert tokenizer.pad_id == tokenizer.token_to_id("<|endoftext|>")
  assert tokenizer.stop_ids == (tokenizer.eos_id,)


def test_hf_tokenizer_encodes_literal_special_tokens_as_single_ids_and_adds_none(hf_dir):
  tokenizer = HFTokenizer(hf_dir / "tokenizer.json")
  start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
  ids = tokenizer.encode("<|im_start|>user\nStep 1: 2 + 3 = 5<|im_end|>")
  assert ids[0] == start and ids[-1] == end
  assert ids.count(start) == 1 and ids.count(end) == 1
  assert tokenizer.token_to_id("<|endoftext|>") not in ids  # post-processor BOS not added
  assert tokenizer.decode(ids) == "<|im_start|>user\nStep 1: 2 + 3 = 5<|im_end|>"
  assert tokenizer.decode(tokenizer.encode(TRICKY_TEXT)) == TRICKY_TEXT
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tokenizer.decode([tokenizer.vocab_size + 7])


def test_hf_tokenizer_falls_back_to_special_tokens_map_and_generation_config(tmp_path):
  hf = _build_hf_tokenizer()
  hf.save(str(tmp_path / "tokenizer.json"))
  _write_json(tmp_path / "special_tokens_map.json", {"eos_token": "<|endoftext|>"})
  _write_json(tmp_path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 0]})
  tokenizer = HFTokenizer(tmp_path / "tokenizer.json")
  assert tokenizer.eos_id == hf.token_to_id("<|endoftext|>") == 0
  assert tokenizer.bos_id == 1  # no tokenizer file names a BOS, generation_config does
  assert tokenizer.pad_id == tokenizer.eos_id  # no pad token anywhere
  assert tokenizer.stop_ids == (0, 2)  # every EOS listed by generation_config stops generation


def test_hf_tokenizer_config_errors_name_the_file_and_key(tmp_path):
  _build_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no EOS token"):
    HFTokenizer(tmp_path / "tokenizer.json")
  config = tmp_path / "tokenizer_config.json"
  _write_json(config, {"eos_token": "<|missing|>"})
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<\|missing\|>' is not in the vocabulary"):
    HFTokenizer(tmp_path / "tokenizer.json")
  _write_json(config, {"eos_token": 7})
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: key 'eos_token' must be"):
    HFTokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="elsewhere.json"):
    HFTokenizer(tmp_path / "tokenizer.json", tmp_path / "elsewhere.json")


def test_load_tokenizer_picks_the_backend(tmp_path, sp_model_path, hf_dir):
  assert isinstance(load_tokenizer(sp_model_path), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
  assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
  sp_dir = tmp_path / "sp_dir"
  sp_dir.mkdir()
  (sp_dir / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
  assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)


def test_load_tokenizer_errors_name_the_path(tmp_path):
  missing = tmp_path / "no_such_model"
  with pytest.raises(FileNotFoundError, match="no_such_model"):
    load_tokenizer(missing)
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="empty_dir"):
    load_tokenizer(empty)
  odd = tmp_path / "vocab.txt"
  odd.write_text("a\n")
  with pytest.raises(ValueError, match="vocab.txt"):
    load_tokenizer(odd)
  broken = tmp_path / "broken.model"
  broken.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="broken.model"):
    load_tokenizer(broken)
