"""One tokenizer interface over two backends: SentencePiece (.model) and HF `tokenizers` (tokenizer.json).

The training stack only needs token ids, the special ids that frame an example (BOS, EOS, pad)
and the ids of chat markers such as "<|im_end|>". Both backends:
  * never add BOS/EOS on `encode` (callers add `bos_id`/`eos_id` explicitly, so SFT and CFT
    examples are framed the same way whatever the checkpoint's post-processor would do);
  * recognise special / user-defined tokens written literally in text as single ids;
  * reject ids outside the vocabulary on `decode` instead of silently dropping them;
  * pickle (Grain workers start with spawn and receive the tokenizer by pickling).

`train_sentencepiece` builds the small offline tokenizer used by the embedded demo.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm
import tokenizers

from cftjax import files
from cftjax.data.records import read_json_object

# Ids of the demo SentencePiece model's special tokens (see `train_sentencepiece`).
SP_PAD_ID = 0
SP_UNK_ID = 1
SP_BOS_ID = 2
SP_EOS_ID = 3
# Chat markers baked into the demo tokenizer as single pieces, so a ChatML-style template
# costs one id per marker, like in Qwen.
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of cftjax may rely on, whatever the backend."""

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (special tokens included)."""

  @property
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id, or None where the model uses none (Qwen)."""

  @property
  def eos_id(self) -> int:
    """End-of-sequence id appended after a target."""

  @property
  def pad_id(self) -> int:
    """Padding id (the EOS id where the tokenizer defines no pad token)."""

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end generation: `eos_id` first, then any extra EOS ids the model lists."""

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS added; literal special tokens map to their ids."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens that have a surface form keep it (cut at EOS first)."""

  def token_to_id(self, token: str) -> int | None:
    """Id of a whole token such as "<|im_end|>", or None if it is not in the vocabulary."""


def _check_ids(ids: Sequence[int], vocab_size: int, source: str) -> list[int]:
  checked = [int(i) for i in ids]
  for position, token_id in enumerate(checked):
    if not 0 <= token_id < vocab_size:
      raise ValueError(
          f"token id {token_id} at position {position} is outside the vocabulary "
          f"[0, {vocab_size}) of tokenizer {source}"
      )
  return checked


class _SpecialIds:
  """The special-token ids a backend resolves once when it loads."""

  _bos_id: int | None
  _eos_id: int
  _pad_id: int
  _stop_ids: tuple[int, ...]

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self._stop_ids


class SentencePieceTokenizer(_SpecialIds):
  """SentencePiece backend for a `.model` file (the demo tokenizer, Llama 2 / Mistral style)."""

  def __init__(self, model_path: str | os.PathLike[str]):
    self.path = Path(model_path)
    if not self.path.is_file():
      raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
    self._processor = spm.SentencePieceProcessor()
    try:
      self._processor.Load(str(self.path))
    except (OSError, RuntimeError) as error:
      raise ValueError(f"cannot load SentencePiece model {self.path}: {error}") from error
    eos = self._processor.eos_id()
    if eos < 0:
      raise ValueError(f"SentencePiece model {self.path} defines no EOS token (eos_id=-1)")
    self._eos_id = eos
    bos = self._processor.bos_id()
    self._bos_id = bos if bos >= 0 else None
    pad = self._processor.pad_id()
    self._pad_id = pad if pad >= 0 else eos
    self._stop_ids = (eos,)

  @property
  def vocab_size(self) -> int:
    return self._processor.vocab_size()

  def encode(self, text: str) -> list[int]:
    return self._processor.Encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    # Control ids (pad/BOS/EOS) decode to "", user-defined symbols to their text.
    return self._processor.Decode(_check_ids(ids, self.vocab_size, str(self.path)))

  def token_to_id(self, token: str) -> int | None:
    token_id = self._processor.PieceToId(token)
    # PieceToId answers the unk id for unknown pieces; tell the two apart.
    return token_id if self._processor.IdToPiece(token_id) == token else None

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _token_text(value: Any, path: Path, key: str) -> str | None:
  """A special-token entry is a string, {"content": str, ...} or null."""
  if value is None:
    return None
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{path}: key {key!r} must be a string, {{'content': str}} or null, got {value!r}")


def _id_list(value: Any, path: Path, key: str) -> list[int]:
  """generation_config.json stores ids as an int, a list of ints or null."""
  if value is None:
    return []
  values = value if isinstance(value, list) else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise ValueError(f"{path}: key {key!r} must be an int or a list of ints, got {value!r}")
  return values


class HFTokenizer(_SpecialIds):
  """HF `tokenizers` backend for tokenizer.json (Qwen2/2.5, Llama 3, Mistral fast tokenizers).

  Special tokens come from, in order of precedence: `tokenizer_config.json` (bos_token,
  eos_token, pad_token), `special_tokens_map.json`, then `generation_config.json`
  (bos_token_id, eos_token_id, pad_token_id). All three are optional and read from the
  directory of tokenizer.json (the config path may be given). Every id that
  generation_config lists in eos_token_id (Llama 3 Instruct lists three) joins `stop_ids`.
  No pad token means pad = EOS; no EOS anywhere is an error.
  """

  def __init__(
      self,
      tokenizer_json_path: str | os.PathLike[str],
      tokenizer_config_path: str | os.PathLike[str] | None = None,
  ):
    self.path = Path(tokenizer_json_path)
    if not self.path.is_file():
      raise FileNotFoundError(f"tokenizer.json not found: {self.path}")
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
    except Exception as error:  # the Rust side raises plain Exception subclasses
      raise ValueError(f"cannot load HF tokenizer {self.path}: {error}") from error
    directory = self.path.parent
    config_path = (
        Path(tokenizer_config_path) if tokenizer_config_path is not None else directory / "tokenizer_config.json"
    )
    if tokenizer_config_path is not None and not config_path.is_file():
      raise FileNotFoundError(f"tokenizer config not found: {config_path}")
    token_files = [
        (p, read_json_object(p)) for p in (config_path, directory / "special_tokens_map.json") if p.is_file()
    ]
    generation_path = directory / "generation_config.json"
    generation = read_json_object(generation_path) if generation_path.is_file() else {}

    def resolve(name: str) -> int | None:
      """Id of special token `name` ("bos"/"eos"/"pad").

      The first file that has the key decides, even when it says null: Qwen's
      tokenizer_config sets bos_token null although generation_config names one.
      """
      key = f"{name}_token"
      for path, content in token_files:
        if key in content:
          text = _token_text(content[key], path, key)
          if text is None:
            return None
          token_id = self._tokenizer.token_to_id(text)
          if token_id is None:
            raise ValueError(f"{path}: {key} {text!r} is not in the vocabulary of {self.path}")
          return token_id
      ids = _id_list(generation.get(f"{key}_id"), generation_path, f"{key}_id")
      return ids[0] if ids else None

    generation_eos = _id_list(generation.get("eos_token_id"), generation_path, "eos_token_id")
    eos_id = resolve("eos")
    if eos_id is None and generation_eos:
      eos_id = generation_eos[0]
    if eos_id is None:
      looked_at = ", ".join(str(p) for p, _ in token_files) or "no tokenizer_config.json"
      raise ValueError(f"no EOS token for {self.path}: none set in {looked_at} or {generation_path}")
    self._eos_id = eos_id
    self._bos_id = resolve("bos")
    pad_id = resolve("pad")
    self._pad_id = pad_id if pad_id is not None else eos_id
    self._stop_ids = tuple(dict.fromkeys([eos_id, *generation_eos]))
    for token_id in (self._eos_id, self._bos_id, self._pad_id, *self._stop_ids):
      if token_id is not None and not 0 <= token_id < self.vocab_size:
        raise ValueError(f"special token id {token_id} for {self.path} is outside [0, {self.vocab_size})")

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode` plus each token's (start, end) character span in `text`."""
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def decode(self, ids: Sequence[int]) -> str:
    checked = _check_ids(ids, self.vocab_size, str(self.path))
    return self._tokenizer.decode(checked, skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
  """Tokenizer from a `.model` file, a `tokenizer.json`, or a model directory holding either.

  In a directory tokenizer.json wins over tokenizer.model (it carries the added chat tokens).
  """
  path = Path(path)
  if path.is_file():
    if path.suffix == ".model":
      return SentencePieceTokenizer(path)
    if path.suffix == ".json":
      return HFTokenizer(path)
    raise ValueError(f"not a tokenizer file (expected *.model or tokenizer.json): {path}")
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return HFTokenizer(path / "tokenizer.json")
    if (path / "tokenizer.model").is_file():
      return SentencePieceTokenizer(path / "tokenizer.model")
    models = sorted(path.glob("*.model"))
    if len(models) == 1:
      return SentencePieceTokenizer(models[0])
    if len(models) > 1:
      names = ", ".join(m.name for m in models)
      raise ValueError(f"several SentencePiece models in {path} ({names}); pass one file")
    raise FileNotFoundError(f"no tokenizer.json, tokenizer.model or *.model in directory {path}")
  raise FileNotFoundError(f"tokenizer path does not exist: {path}")


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = ("\n", *CHAT_MARKERS),
    max_sentences: int = 50_000,
) -> Path:
  """Train a small SentencePiece model offline and write `{model_prefix}.model` atomically.

  Settings chosen so that `decode(encode(text)) == text` for any text: identity
  normalisation, no dummy prefix, whitespace kept as is, byte fallback for unseen
  characters, and "\\n" a single user-defined piece. Numbers split digit by digit. Ids:
  pad=0, unk=1, bos=2, eos=3 (`SP_*_ID`). `vocab_size` is an upper bound: on a small corpus
  the model may end up smaller (read `vocab_size` from the loaded tokenizer). Only the first
  `max_sentences` texts are used, so the result is a pure function of the inputs.
  """
  prefix = Path(model_prefix)
  sentences = []
  for text in texts:
    if len(sentences) >= max_sentences:
      break
    if not isinstance(text, str):
      raise TypeError(f"train_sentencepiece: text #{len(sentences)} is {type(text).__name__}, not str")
    if text:
      sentences.append(text)
  if not sentences:
    raise ValueError(f"train_sentencepiece({prefix}): no non-empty training text")
  model_bytes = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(sentences),
      model_writer=model_bytes,  # in-memory: no model_prefix baked into the file, atomic write below
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      model_type=model_type,
      split_digits=True,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      user_defined_symbols=list(user_defined_symbols),
      pad_id=SP_PAD_ID,
      unk_id=SP_UNK_ID,
      bos_id=SP_BOS_ID,
      eos_id=SP_EOS_ID,
      max_sentence_length=max(len(s.encode("utf-8")) for s in sentences) + 1,
      shuffle_input_sentence=False,
      num_threads=1,  # deterministic and plenty fast for the demo corpus
      minloglevel=2,  # errors only: training is otherwise chatty on stderr
  )
  model_path = prefix.with_name(prefix.name + ".model")
  files.write_bytes_atomically(model_path, model_bytes.getvalue())
  return model_path
