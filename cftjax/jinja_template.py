"""A model's own chat template (Jinja, from its tokenizer files), rendered as transformers does.

Same environment as transformers' `apply_chat_template`: a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, loop controls, the `{% generation %}` tag, the globals
raise_exception / strftime_now / namespace / dict, a `tojson` that does not escape HTML, and the
tokenizer's named special tokens (bos_token, eos_token, ...) as variables. The rendered text is
tokenized whole, without added BOS/EOS, so the ids equal `apply_chat_template(tokenize=True)`.

The loss mask covers the final assistant reply: the last `{% generation %}` span where the
template has them (exactly transformers' assistant mask for that turn), else the text the
conversation adds after the generation prompt, up to its trailing whitespace (the reply and
its end-of-turn marker). Earlier assistant turns are context, as in the named templates.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import json
import re
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

# Where transformers finds a tokenizer's template, highest precedence first.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# (spans, blocks rendered so far) of the render in progress; per thread, as readers tokenize in threads.
_TRACKING: contextvars.ContextVar = contextvars.ContextVar("chat_template_tracking", default=None)


class _GenerationTracker(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: records the character span the body renders to."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

  def _track(self, caller):
    text = caller()
    tracking = _TRACKING.get()
    if tracking is not None:
      spans, blocks = tracking
      start = len("".join(blocks))
      spans.append((start, start + len(text)))
    return text


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
  return datetime.datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
  """Jinja's namespace without underscore attributes (no way into Python internals)."""

  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"chat template namespace attribute {name!r} starts with '_'")


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace, dict=dict)
  return env.from_string(source)


def _token_text(value: Any) -> str | None:
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  if not isinstance(content, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return content


def find_template(directory: str | Path) -> tuple[str, Path] | None:
  """(template source, file it came from) for a tokenizer directory, or None if it has none.

  A list of named templates (tokenizer_config's [{name, template}] form) gives "default".
  """
  directory = Path(directory)
  for name in TEMPLATE_FILES:
    path = directory / name
    if not path.is_file():
      continue
    if name.endswith(".jinja"):
      return path.read_text(encoding="utf-8"), path
    template = _read_json(path).get("chat_template")
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      if "default" not in named:
        raise ValueError(
            f"{path}: 'chat_template' is a list of named templates without a 'default' one "
            f"(names: {sorted(n for n in named if n)})"
        )
      template = named["default"]
    if isinstance(template, str) and template.strip():
      return template, path
    if template is not None:
      raise ValueError(f"{path}: 'chat_template' must be a string or a list of {{name, template}}")
  return None


@dataclasses.dataclass(frozen=True)
class ModelTemplate:
  source: str
  origin: str  # the file it came from, for messages
  special_tokens: tuple[tuple[str, str], ...]  # (name, text) passed to the template

  @property
  def has_generation_tags(self) -> bool:
    return bool(_GENERATION_TAG.search(self.source))

  def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of {% generation %} blocks)."""
    template = _compile(self.source)
    spans: list[tuple[int, int]] = []
    blocks: list[str] = []
    token = _TRACKING.set((spans, blocks))
    try:
      for block in template.generate(
          messages=[dict(m) for m in messages],
          tools=None,
          documents=None,
          add_generation_prompt=add_generation_prompt,
          **dict(self.special_tokens),
      ):
        blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"chat template from {self.origin}: {e}") from None
    finally:
      _TRACKING.reset(token)
    return "".join(blocks), spans

  def reply_span(self, context: Sequence[dict], reply: str) -> tuple[str, tuple[int, int]]:
    """The rendered conversation and the character span of the final reply's target."""
    messages = [*context, {"role": "assistant", "content": reply}]
    text, spans = self.render(messages, add_generation_prompt=False)
    if self.has_generation_tags:
      if not spans:
        raise ValueError(
            f"chat template from {self.origin} has {{% generation %}} tags but rendered none " "for the assistant reply"
        )
      return text, spans[-1]
    prompt, _ = self.render(context, add_generation_prompt=True)
    if not text.startswith(prompt):
      raise ValueError(
          f"chat template from {self.origin} renders the context differently when a reply follows, "
          "so the reply cannot be located; add {% generation %} tags around the assistant content"
      )
    return text, (len(prompt), len(text.rstrip()))


def load(directory: str | Path) -> ModelTemplate | None:
  """The template and special-token variables of a tokenizer directory, or None without one."""
  directory = Path(directory)
  found = find_template(directory)
  if found is None:
    return None
  source, origin = found
  tokens: dict[str, str] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
    path = directory / name
    if path.is_file():
      content = _read_json(path)
      for key in SPECIAL_TOKEN_NAMES:
        if key in content:
          text = _token_text(content[key])
          if text is None:
            tokens.pop(key, None)
          else:
            tokens[key] = text
  return ModelTemplate(source, str(origin), tuple(sorted(tokens.items())))


def _overlapping(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
  # transformers' rule: a token is in the mask when its characters overlap the span.
  start, end = span
  return [int(token_end > start and token_start < end) for token_start, token_end in offsets]


def encode(template: ModelTemplate, tokenizer, context: Sequence[dict], reply: str) -> tuple[list[int], list[int]]:
  """Ids of the whole rendered conversation and a mask on the final reply's tokens."""
  text, span = template.reply_span(context, reply)
  ids, offsets = _encode_with_offsets(tokenizer, text)
  return ids, _overlapping(offsets, span)


def prompt_ids(template: ModelTemplate, tokenizer, context: Sequence[dict]) -> list[int]:
  text, _ = template.render(context, add_generation_prompt=True)
  return _encode_with_offsets(tokenizer, text)[0]


def end_of_turn_text(template: ModelTemplate) -> str:
  """What the template writes after a reply's content inside the reply's target ("<|im_end|>",
  "</s>", ...): generation should stop there. Found by rendering a probe conversation."""
  probe = "cftjax probe reply"
  text, (start, end) = template.reply_span([{"role": "user", "content": "hi"}], probe)
  at = text.find(probe, start, end)
  return text[at + len(probe) : end].strip() if at >= 0 else ""


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  encode = getattr(tokenizer, "encode_with_offsets", None)
  if encode is None:
    raise ValueError(
        f"data.chat_template='model' needs a tokenizer.json tokenizer (character offsets); " f"got {tokenizer!r}"
    )
  return encode(text)
