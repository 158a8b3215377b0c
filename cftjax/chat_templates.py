"""Chat templates: a conversation -> token ids + a loss mask on the assistant's reply.

A template renders the conversation as text pieces, each marked target or not. Pieces
are tokenized one by one and concatenated, so the mask lands exactly on the assistant
content and its end token. Piece boundaries sit next to special tokens or newlines, where
the tokenizers of these families split anyway, so the ids equal tokenizing the whole text
(tests check this against transformers' `apply_chat_template`).

One deliberate exception: a qwen reply that starts with whitespace holding a newline
("\nx") would merge with the header's "\n" in whole-text tokenization. We keep the two
apart, so the ids of every example start with exactly the generation prompt
(`prompt_ids`), which is what the model is given at inference.

"model" is the tokenizer's own Jinja template, rendered as transformers renders it
(cftjax.jinja_template); the named templates are the fallbacks for models without one.
"""

import dataclasses
import functools
from pathlib import Path
from typing import Protocol, Sequence

from cftjax import jinja_template

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
MODEL = "model"  # the tokenizer's own template
TEMPLATES = (MODEL, "plain", "qwen", "llama3", "llama3_1")
# Llama 3.1 / 3.3 Instruct open every conversation with a dated system block; their
# template writes this date unless the caller passes another, and so do servers using it.
LLAMA3_1_KNOWLEDGE_CUTOFF = "December 2023"
LLAMA3_1_TODAY = "26 Jul 2024"


class TextTokenizer(Protocol):
  bos_id: int | None
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str  # system | user | assistant
  content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Context turns (system / earlier user-assistant turns / the query) and the target reply."""

  context: tuple[Turn, ...]
  reply: str


def _plain(conv: Conversation, tokenizer: TextTokenizer) -> tuple[list[tuple[str, bool]], bool]:
  # "system\n\nuser\n" + reply + EOS. No special tokens: works with any tokenizer.
  pieces = ["\n\n".join(t.content for t in conv.context if t.content) + "\n"]
  return [(pieces[0], False), (conv.reply, True)], True


def _qwen(conv: Conversation, tokenizer: TextTokenizer, default_system: str | None):
  context = list(conv.context)
  if not context or context[0].role != "system":
    system = QWEN_DEFAULT_SYSTEM if default_system is None else default_system
    context.insert(0, Turn("system", system))
  elif not context[0].content and default_system is not None:
    context[0] = Turn("system", default_system)
  pieces = [(f"<|im_start|>{t.role}\n{t.content}<|im_end|>\n", False) for t in context]
  pieces.append(("<|im_start|>assistant\n", False))
  pieces.append((conv.reply + "<|im_end|>", True))
  pieces.append(("\n", False))
  return pieces, False


def _llama3(conv: Conversation, tokenizer: TextTokenizer, default_system: str | None):
  context = list(conv.context)
  if context and context[0].role == "system" and not context[0].content:
    context = context[1:] if default_system is None else [Turn("system", default_system)] + context[1:]
  elif (not context or context[0].role != "system") and default_system:
    context.insert(0, Turn("system", default_system))
  return _llama3_pieces(_llama3_turns(context), conv.reply)


def _llama3_1(conv: Conversation, tokenizer: TextTokenizer, default_system: str | None):
  # Always a system block: the dated header, then the system prompt (possibly empty).
  context = list(conv.context)
  system = context.pop(0).content if context and context[0].role == "system" else ""
  system = system.strip() or (default_system or "").strip()
  header = f"Cutting Knowledge Date: {LLAMA3_1_KNOWLEDGE_CUTOFF}\nToday Date: {LLAMA3_1_TODAY}\n\n"
  turns = [f"<|start_header_id|>system<|end_header_id|>\n\n{header}{system}<|eot_id|>"]
  return _llama3_pieces(turns + _llama3_turns(context), conv.reply)


def _llama3_turns(context: Sequence[Turn]) -> list[str]:
  return [f"<|start_header_id|>{t.role}<|end_header_id|>\n\n{t.content.strip()}<|eot_id|>" for t in context]


def _llama3_pieces(turns: Sequence[str], reply: str) -> tuple[list[tuple[str, bool]], bool]:
  pieces = [("<|begin_of_text|>", False)] + [(turn, False) for turn in turns]
  pieces.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
  pieces.append((reply.strip() + "<|eot_id|>", True))
  return pieces, False


def render(
    conv: Conversation, template: str, tokenizer: TextTokenizer, default_system: str | None = None
) -> tuple[list[tuple[str, bool]], bool]:
  """Returns ([(text, is_target)], append_eos). append_eos: the template ends with EOS id."""
  if template == "plain":
    return _plain(conv, tokenizer)
  if template == "qwen":
    return _qwen(conv, tokenizer, default_system)
  if template == "llama3":
    return _llama3(conv, tokenizer, default_system)
  if template == "llama3_1":
    return _llama3_1(conv, tokenizer, default_system)
  raise ValueError(f"config key data.chat_template={template!r} is not one of {TEMPLATES}")


def encode(
    conv: Conversation, template: str, tokenizer: TextTokenizer, default_system: str | None = None
) -> tuple[list[int], list[int]]:
  """Token ids and a 0/1 loss mask that is 1 exactly on the reply (and its end token)."""
  if template == MODEL:
    context = _model_messages(conv.context, default_system)
    return jinja_template.encode(model_template_for(tokenizer), tokenizer, context, conv.reply)
  pieces, append_eos = render(conv, template, tokenizer, default_system)
  ids: list[int] = []
  mask: list[int] = []
  if template == "plain" and tokenizer.bos_id is not None:
    ids.append(tokenizer.bos_id)
    mask.append(0)
  for text, is_target in pieces:
    piece_ids = tokenizer.encode(text) if text else []
    ids.extend(piece_ids)
    mask.extend([int(is_target)] * len(piece_ids))
  if append_eos:
    ids.append(tokenizer.eos_id)
    mask.append(1)
  return ids, mask


def prompt_ids(
    context: Sequence[Turn], template: str, tokenizer: TextTokenizer, default_system: str | None = None
) -> list[int]:
  """Ids of the context up to where the reply starts: the generation prompt."""
  if template == MODEL:
    messages = _model_messages(context, default_system)
    return jinja_template.prompt_ids(model_template_for(tokenizer), tokenizer, messages)
  ids, mask = encode(Conversation(tuple(context), ""), template, tokenizer, default_system)
  # The reply is empty, so the first target position is where generation starts.
  first_target = mask.index(1) if 1 in mask else len(ids)
  return ids[:first_target]


# ------------------------------------------------------------------------------ the model's own
def _model_messages(context: Sequence[Turn], default_system: str | None) -> list[dict]:
  messages = [{"role": t.role, "content": t.content} for t in context]
  if default_system:  # data.system_prompt fills a missing or empty system turn; else the template decides
    if messages and messages[0]["role"] == "system":
      if not messages[0]["content"]:
        messages[0]["content"] = default_system
    else:
      messages.insert(0, {"role": "system", "content": default_system})
  return messages


def end_of_turn_ids(template: str, tokenizer) -> tuple[int, ...]:
  """Ids that end an assistant turn in `template`, beyond the tokenizer's EOS: a model's own
  template's end marker when it is a single token (e.g. "<|end|>")."""
  if template == MODEL:
    marker = jinja_template.end_of_turn_text(model_template_for(tokenizer))
    ids = tokenizer.encode(marker) if marker else []
    return tuple(ids) if len(ids) == 1 else ()
  names = {"qwen": "<|im_end|>", "llama3": "<|eot_id|>", "llama3_1": "<|eot_id|>"}
  token = tokenizer.token_to_id(names[template]) if template in names else None
  return (token,) if token is not None else ()


def tokenizer_dir(tokenizer) -> Path:
  """Directory of a loaded tokenizer's files (where its chat template lives)."""
  path = getattr(tokenizer, "path", None)
  if path is None:
    raise ValueError(f"data.chat_template='model': tokenizer {tokenizer!r} has no files to read a template from")
  path = Path(path)
  return path if path.is_dir() else path.parent


@functools.lru_cache(maxsize=8)
def _load_model_template(directory: Path) -> jinja_template.ModelTemplate:
  template = jinja_template.load(directory)
  if template is None:
    raise ValueError(
        f"data.chat_template='model' but {directory} has no chat template "
        f"({', '.join(jinja_template.TEMPLATE_FILES)}); set data.chat_template to one of {TEMPLATES[1:]}"
    )
  return template


def model_template_for(tokenizer) -> jinja_template.ModelTemplate:
  return _load_model_template(tokenizer_dir(tokenizer).resolve())


def named_template_for(family: str, tokenizer_dir: Path) -> str:
  """The named template most likely matching a model without a template of its own."""
  if family == "qwen2":
    return "qwen"
  tokenizer_json = tokenizer_dir / "tokenizer.json"
  if not (tokenizer_json.is_file() and "<|start_header_id|>" in tokenizer_json.read_text(encoding="utf-8")):
    return "plain"
  # The chat template sits in tokenizer_config.json (older exports) or chat_template.jinja.
  templates = [tokenizer_dir / "tokenizer_config.json", tokenizer_dir / "chat_template.jinja"]
  if any(path.is_file() and "Cutting Knowledge Date" in path.read_text(encoding="utf-8") for path in templates):
    return "llama3_1"
  return "llama3"


def template_for_import(family: str, tokenizer_dir: str | Path) -> str:
  """data.chat_template for an imported model: its own template when it has one."""
  tokenizer_dir = Path(tokenizer_dir)
  if jinja_template.find_template(tokenizer_dir) is not None:
    return MODEL
  return named_template_for(family, tokenizer_dir)


def describe(template: str, tokenizer_dir: str | Path | None) -> str:
  """What a data.chat_template value means for this tokenizer, for the console."""
  if template != MODEL:
    return f"chat template {template!r} (named; the model has no template of its own)"
  found = jinja_template.find_template(tokenizer_dir) if tokenizer_dir else None
  where = found[1].name if found else "the tokenizer files"
  return f"chat template 'model' (the model's own, from {where})"
