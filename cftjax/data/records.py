"""Raw JSON/JSONL rows -> canonical example records, with row-level validation.

A canonical record is a dict of str -> str with exactly the keys in `CANONICAL_KEYS`,
the one shape shared by the TFDS builder, the Grain pipeline and the demo task:
objective ("cft"/"sft"), query, response (critiqued response for CFT, target for SFT),
critique (CFT target, no "Critique:" prefix; "" for SFT), system, history (JSON list of
earlier {role, content} turns, "[]" if none), answer, label ("right"/"wrong"/"").

Input files are `.jsonl` (one JSON object per line; blank lines are not rows) or
`.json` (one top-level list of objects). Files are read as bytes and decoded line by
line with strict UTF-8 so every error names the file and line (`data.jsonl:17`) or,
for `.json`, the 0-based index into the top-level list (`data.json:row 3`).

Supported row formats (`FORMATS`):
  webinstruct_cft  {instruction, input, output}: the CFT paper's files. `input` is
                   "Question:\\n{query}\\n\\nSolution:\\n{response}" and `output` the
                   critique, maybe prefixed "Critique:". If `input` lacks those markers
                   it cannot be split, so the whole prompt is kept as the query
                   (instruction + "\\n" + input) and the response is "" - the row still
                   trains the critique; it is not silently reinterpreted.
  messages         {"messages": [{role, content}]} or ShareGPT {"conversations":
                   [{from, value}]} (human/gpt/system) -> SFT on the last assistant
                   turn, which must end the conversation and follow a user turn (the
                   query); a leading system turn -> "system"; turns before the query ->
                   "history".
  triples          {query, response, critique} -> CFT.
  sft              {query|prompt|question|instruction(+input), response|output|answer}:
                   the first key present in that order; a non-empty Alpaca "input" is
                   joined to "instruction" with "\n" (as the CFT prompt does).
Optional string fields are copied when present: "answer" (webinstruct_cft, triples,
sft), "system" (triples, sft), "label" (triples; else the critique's verdict, read as
evaluation reads it: grading.parse_verdict). Other keys (ids, scores, ...) are not part
of the schema and are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

from cftjax import grading

Record = dict[str, str]

CANONICAL_KEYS: tuple[str, ...] = (
    "objective",
    "query",
    "response",
    "critique",
    "system",
    "history",
    "answer",
    "label",
)
FORMATS: tuple[str, ...] = ("webinstruct_cft", "messages", "triples", "sft")
AUTO = "auto"

# Reason codes carried by InvalidRow and counted by SkipReport.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
EMPTY_FIELD = "empty_field"
NON_STRING_FIELD = "non_string_field"
BAD_UTF8 = "bad_utf8"
BAD_TURNS = "bad_turns"  # `messages` rows whose turn structure has no usable target
BAD_VALUE = "bad_value"  # a field with a value outside its allowed set (e.g. label)
REASONS: tuple[str, ...] = (
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    EMPTY_FIELD,
    NON_STRING_FIELD,
    BAD_UTF8,
    BAD_TURNS,
    BAD_VALUE,
)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
MAX_EXAMPLES_PER_REASON = 5
DETECTION_SAMPLE_ROWS = 20


class RowRef(NamedTuple):
  """Where a row came from: a 1-based line of a .jsonl file or a 0-based list index of a .json file."""

  path: str
  line: int  # 1-based; for a .json list, the line where the item starts

  def __str__(self) -> str:
    return f"{self.path}:{self.line}"


class InvalidRow(ValueError):
  """A row (or whole file) that cannot become a canonical record.

  `reason` is one of REASONS; str(error) reads like
  "data.jsonl:17: missing field 'critique' (format triples)".
  """

  def __init__(self, ref: RowRef, reason: str, detail: str, format_name: str | None = None):
    self.ref = ref
    self.path = ref.path
    self.line = ref.line
    self.reason = reason
    self.detail = detail
    self.format_name = format_name
    suffix = f" (format {format_name})" if format_name else ""
    super().__init__(f"{ref}: {detail}{suffix}")


class InvalidFile(ValueError):
  """A file that cannot be read as rows at all (bad suffix, not a JSON list, ...).

  Never skippable: skipping would drop the whole file.
  """


@dataclasses.dataclass
class SkipReport:
  """Rows skipped under skip_invalid: counts per reason, first few messages per reason."""

  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def add(self, error: InvalidRow) -> None:
    self.counts[error.reason] = self.counts.get(error.reason, 0) + 1
    shown = self.examples.setdefault(error.reason, [])
    if len(shown) < MAX_EXAMPLES_PER_REASON:
      shown.append(str(error))

  def merge(self, other: "SkipReport") -> None:
    for reason, count in other.counts.items():
      self.counts[reason] = self.counts.get(reason, 0) + count
      shown = self.examples.setdefault(reason, [])
      room = MAX_EXAMPLES_PER_REASON - len(shown)
      shown.extend(other.examples.get(reason, [])[: max(room, 0)])

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict[str, Any]:
    return {
        "total": self.total,
        "counts": dict(self.counts),
        "examples": {k: list(v) for k, v in self.examples.items()},
    }

  def summary_lines(self) -> list[str]:
    """Human-readable lines: one per reason with its count, then its first refs."""
    lines = []
    for reason in sorted(self.counts):
      lines.append(f"{reason}: {self.counts[reason]}")
      lines.extend(f"  {message}" for message in self.examples.get(reason, []))
    return lines


def make_record(**fields: str) -> Record:
  """A canonical record: the given fields plus "" for the rest ("[]" for history)."""
  unknown = set(fields) - set(CANONICAL_KEYS)
  if unknown:
    raise KeyError(f"not canonical record keys: {sorted(unknown)}")
  record = {key: "" for key in CANONICAL_KEYS}
  record["history"] = "[]"
  record.update(fields)
  return record


# ----------------------------------------------------------------------------- reading


def iter_raw_rows(path: str | os.PathLike) -> Iterator[tuple[RowRef, Any]]:
  """Yields (ref, parsed JSON object or InvalidRow) for each row of one file.

  Row-level problems are yielded (not raised) so the caller decides whether to
  skip; file-level problems raise InvalidFile / InvalidRow.
  """
  path_str = os.fspath(path)
  lowered = path_str.lower()
  if lowered.endswith(JSONL_SUFFIXES):
    yield from iter_jsonl_rows(path_str)
  elif lowered.endswith(JSON_SUFFIXES):
    yield from iter_json_list_rows(path_str)
  else:
    raise InvalidFile(
        f"{path_str}: unsupported file type; expected one of " f"{', '.join(JSONL_SUFFIXES + JSON_SUFFIXES)}"
    )


def iter_jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[RowRef, Any]]:
  """(ref, row object or InvalidRow) for each non-blank line of a JSONL file."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      ref = RowRef(path, line_number)
      if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark written by some editors
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield ref, InvalidRow(ref, BAD_UTF8, f"invalid UTF-8 at byte offset {e.start} of the line")
        continue
      if not text.strip():
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        yield ref, InvalidRow(ref, MALFORMED_JSON, f"malformed JSON: {e.msg} at column {e.colno}")
        continue
      if not isinstance(row, dict):
        yield ref, InvalidRow(ref, NOT_AN_OBJECT, f"row is a JSON {_json_type(row)}, not an object")
        continue
      yield ref, row


def iter_json_list_rows(path: str | os.PathLike) -> Iterator[tuple[RowRef, Any]]:
  """(ref, row object or InvalidRow) for each item of a .json file's top-level list; the
  ref is the line where the item starts. An unreadable file raises."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise InvalidRow(RowRef(path, line), BAD_UTF8, "invalid UTF-8 (the whole .json file is unreadable)") from None
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise InvalidRow(
        RowRef(path, e.lineno),
        MALFORMED_JSON,
        f"malformed JSON: {e.msg} at column {e.colno} (the whole .json file is unreadable)",
    ) from None
  if not isinstance(rows, list):
    line = _line_at(text, _skip_space(text, 0))
    raise InvalidFile(
        f"{path}:{line}: a .json input must hold a list (a JSON list) of row objects, "
        f"got a JSON {_json_type(rows)} (use .jsonl for one object per line)"
    )
  for line, row in zip(_list_item_lines(text), rows):
    ref = RowRef(path, line)
    if not isinstance(row, dict):
      yield ref, InvalidRow(ref, NOT_AN_OBJECT, f"row is a JSON {_json_type(row)}, not an object")
    else:
      yield ref, row


def _list_item_lines(text: str) -> Iterator[int]:
  """The line each item of a valid top-level JSON list starts on."""
  decoder = json.JSONDecoder()
  index = _skip_space(text, text.index("[") + 1)
  while not text.startswith("]", index):
    yield _line_at(text, index)
    _, end = decoder.raw_decode(text, index)
    index = _skip_space(text, end)
    if text.startswith(",", index):
      index = _skip_space(text, index + 1)


def _skip_space(text: str, index: int) -> int:
  while index < len(text) and text[index] in " \t\r\n":
    index += 1
  return index


def _line_at(text: str, index: int) -> int:
  return text.count("\n", 0, index) + 1


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
  """A JSON file holding one object (a model's config.json, a tokenizer config), or a
  ValueError naming the file and line."""
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{os.fspath(path)}: invalid JSON at line {error.lineno}: {error.msg}") from error
  if not isinstance(content, dict):
    raise ValueError(f"{os.fspath(path)}: expected a JSON object, got {type(content).__name__}")
  return content


def _json_type(value: Any) -> str:
  names = {
      dict: "object",
      list: "array",
      str: "string",
      bool: "boolean",
      int: "number",
      float: "number",
      type(None): "null",
  }
  return names.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- fields


class _FieldError(Exception):
  """Internal: a field problem, turned into InvalidRow with the row's ref by the caller."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason
    self.detail = detail


def _required_str(row: Mapping[str, Any], key: str) -> str:
  if key not in row:
    raise _FieldError(MISSING_FIELD, f"missing field '{key}'")
  return _nonempty_str(row[key], f"field '{key}'")


def _nonempty_str(value: Any, what: str) -> str:
  if value is None:
    raise _FieldError(EMPTY_FIELD, f"empty {what} (null)")
  if not isinstance(value, str):
    raise _FieldError(NON_STRING_FIELD, f"{what} is a JSON {_json_type(value)}, expected a string")
  if not value.strip():
    raise _FieldError(EMPTY_FIELD, f"empty {what}")
  return value


def _optional_str(row: Mapping[str, Any], key: str) -> str:
  """A string field that may be absent, null or empty (-> "") but not another type."""
  value = row.get(key)
  if value is None:
    return ""
  if not isinstance(value, str):
    raise _FieldError(NON_STRING_FIELD, f"field '{key}' is a JSON {_json_type(value)}, expected a string")
  return value


def _first_present(row: Mapping[str, Any], keys: Sequence[str]) -> str | None:
  return next((key for key in keys if key in row), None)


# ----------------------------------------------------------------------------- formats

_QUESTION_SOLUTION = re.compile(
    r"^\s*Question:[ \t]*\n(?P<query>.*?)\n\s*Solution:[ \t]*\n(?P<response>.*)$", re.DOTALL
)
_CRITIQUE_PREFIX = re.compile(r"^\s*Critique:[ \t]*\n?")


def critique_label(critique: str) -> str:
  """The critique's verdict as a record label: "right"/"wrong" by the rules evaluation
  grades with (grading.parse_verdict), else ""."""
  return grading.parse_verdict(critique) or ""


def split_question_solution(text: str) -> tuple[str, str] | None:
  """("query", "response") from "Question:\\n{q}\\n\\nSolution:\\n{r}", or None without the markers."""
  match = _QUESTION_SOLUTION.match(text)
  if not match:
    return None
  query, response = match.group("query").strip(), match.group("response").strip()
  return (query, response) if query and response else None


def strip_critique_prefix(text: str) -> str:
  return _CRITIQUE_PREFIX.sub("", text, count=1).strip()


def parse_webinstruct_cft(row: Mapping[str, Any]) -> Record:
  if "instruction" not in row:
    raise _FieldError(MISSING_FIELD, "missing field 'instruction'")
  instruction = _optional_str(row, "instruction")  # the fixed task prompt; may be empty
  prompt = _required_str(row, "input")
  critique = strip_critique_prefix(_required_str(row, "output"))
  if not critique:
    raise _FieldError(EMPTY_FIELD, "empty field 'output' (nothing after 'Critique:')")
  parts = split_question_solution(prompt)
  if parts is None:  # no markers: keep the whole prompt as the query (module docstring)
    query, response = (f"{instruction}\n{prompt}" if instruction.strip() else prompt), ""
  else:
    query, response = parts
  return make_record(
      objective="cft",
      query=query,
      response=response,
      critique=critique,
      answer=_optional_str(row, "answer"),
      label=critique_label(critique),
  )


def parse_triples(row: Mapping[str, Any]) -> Record:
  query = _required_str(row, "query")
  response = _required_str(row, "response")
  critique = strip_critique_prefix(_required_str(row, "critique"))
  label = _optional_str(row, "label").strip().lower() or critique_label(critique)
  if label not in ("", "right", "wrong"):
    raise _FieldError(BAD_VALUE, f"field 'label' is {row['label']!r}, expected 'right' or 'wrong'")
  return make_record(
      objective="cft",
      query=query,
      response=response,
      critique=critique,
      system=_optional_str(row, "system"),
      answer=_optional_str(row, "answer"),
      label=label,
  )


SFT_QUERY_KEYS = ("query", "prompt", "question", "instruction")
SFT_RESPONSE_KEYS = ("response", "output", "answer")


def parse_sft(row: Mapping[str, Any]) -> Record:
  query_key = _first_present(row, SFT_QUERY_KEYS)
  if query_key is None:
    raise _FieldError(MISSING_FIELD, f"missing field '{'|'.join(SFT_QUERY_KEYS)}'")
  response_key = _first_present(row, SFT_RESPONSE_KEYS)
  if response_key is None:
    raise _FieldError(MISSING_FIELD, f"missing field '{'|'.join(SFT_RESPONSE_KEYS)}'")
  query = _nonempty_str(row[query_key], f"field '{query_key}'")
  if query_key == "instruction":  # Alpaca style: optional "input" follows the instruction
    extra = _optional_str(row, "input")
    if extra.strip():
      query = f"{query}\n{extra}"
  response = _nonempty_str(row[response_key], f"field '{response_key}'")
  answer = _optional_str(row, "answer") if response_key != "answer" else ""
  return make_record(
      objective="sft", query=query, response=response, system=_optional_str(row, "system"), answer=answer
  )


_ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def _normalize_turns(row: Mapping[str, Any]) -> list[dict[str, str]]:
  """[{"role", "content"}] from "messages" (role/content) or "conversations" (from/value)."""
  if "messages" in row:
    key, role_key, content_key = "messages", "role", "content"
  elif "conversations" in row:
    key, role_key, content_key = "conversations", "from", "value"
  else:
    raise _FieldError(MISSING_FIELD, "missing field 'messages|conversations'")
  turns = row[key]
  if not isinstance(turns, list):
    raise _FieldError(
        NON_STRING_FIELD if turns is not None else EMPTY_FIELD,
        f"field '{key}' is a JSON {_json_type(turns)}, expected a list of turns",
    )
  if not turns:
    raise _FieldError(EMPTY_FIELD, f"empty field '{key}'")
  normalized = []
  for i, turn in enumerate(turns):
    where = f"{key}[{i}]"
    if not isinstance(turn, dict):
      raise _FieldError(NOT_AN_OBJECT, f"{where} is a JSON {_json_type(turn)}, not an object")
    if role_key not in turn:
      raise _FieldError(MISSING_FIELD, f"missing field '{where}.{role_key}'")
    if content_key not in turn:
      raise _FieldError(MISSING_FIELD, f"missing field '{where}.{content_key}'")
    role = _ROLE_ALIASES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
    if role is None:
      raise _FieldError(
          BAD_VALUE, f"{where}.{role_key} is {turn[role_key]!r}, expected one of " f"{sorted(_ROLE_ALIASES)}"
      )
    content = turn[content_key]
    if not isinstance(content, str):
      raise _FieldError(
          NON_STRING_FIELD if content is not None else EMPTY_FIELD,
          f"field '{where}.{content_key}' is a JSON {_json_type(content)}, expected a string",
      )
    normalized.append({"role": role, "content": content})
  return normalized


def parse_messages(row: Mapping[str, Any]) -> Record:
  turns = _normalize_turns(row)
  system = ""
  if turns[0]["role"] == "system":
    system, turns = turns[0]["content"], turns[1:]
  if not turns or turns[-1]["role"] != "assistant":
    raise _FieldError(BAD_TURNS, "conversation must end with an assistant turn (the training target)")
  if len(turns) < 2 or turns[-2]["role"] != "user":
    raise _FieldError(BAD_TURNS, "the last assistant turn must follow a user turn (the query)")
  target, query = turns[-1]["content"], turns[-2]["content"]
  _nonempty_str(target, "last assistant turn")
  _nonempty_str(query, "user turn before the last assistant turn")
  history = json.dumps(turns[:-2], ensure_ascii=False)
  return make_record(objective="sft", query=query, response=target, system=system, history=history)


PARSERS: dict[str, Callable[[Mapping[str, Any]], Record]] = {
    "webinstruct_cft": parse_webinstruct_cft,
    "messages": parse_messages,
    "triples": parse_triples,
    "sft": parse_sft,
}


def parse_row(row: Mapping[str, Any], format_name: str, ref: RowRef) -> Record:
  """One raw row -> canonical record; raises InvalidRow naming the row, problem and format."""
  try:
    return PARSERS[format_name](row)
  except _FieldError as e:
    raise InvalidRow(ref, e.reason, e.detail, format_name) from None


# ----------------------------------------------------------------------------- detection


def row_matches(row: Mapping[str, Any]) -> set[str]:
  """The formats whose keys this row has (the shape test used by detection)."""
  keys = set(row)
  matches = set()
  if isinstance(row.get("messages"), list) or isinstance(row.get("conversations"), list):
    matches.add("messages")
  if {"query", "response", "critique"} <= keys:
    matches.add("triples")
  if (
      {"instruction", "input", "output"} <= keys
      and isinstance(row["input"], str)
      and split_question_solution(row["input"]) is not None
  ):
    matches.add("webinstruct_cft")
  if keys & set(SFT_QUERY_KEYS) and keys & set(SFT_RESPONSE_KEYS):
    matches.add("sft")
  return matches


@dataclasses.dataclass(frozen=True)
class FormatDetection:
  format: str
  rows_examined: int
  votes: dict[str, int]

  def describe(self) -> str:
    return (
        f"detected format '{self.format}' ({self.votes.get(self.format, 0)} of the first "
        f"{self.rows_examined} rows match)"
    )


def detect_format(paths: Sequence[str | os.PathLike], sample_rows: int = DETECTION_SAMPLE_ROWS) -> FormatDetection:
  """Picks a format from the keys of the first `sample_rows` object rows of each file.

  The most specific format (FORMATS order) that at least half the sampled rows match
  wins, else the one most rows match: every CFT row also looks like an SFT row, so a
  plain majority vote would turn CFT data with a few bad rows into SFT and silently
  drop its critiques. Unparsable rows are ignored here; reading reports them later.
  Raises ValueError listing the key sets seen when no row matches any format.
  """
  votes: collections.Counter[str] = collections.Counter()
  key_sets: collections.Counter[tuple[str, ...]] = collections.Counter()
  examined = 0
  for path in paths:
    seen_in_file = 0
    for _, row in iter_raw_rows(path):
      if isinstance(row, InvalidRow):
        continue
      examined += 1
      seen_in_file += 1
      key_sets[tuple(sorted(row))] += 1
      votes.update(row_matches(row))
      if seen_in_file >= sample_rows:
        break
  if not votes:
    seen = "; ".join(f"{list(keys)} ({n} rows)" for keys, n in key_sets.most_common(5)) or "no rows"
    raise ValueError(
        f"could not detect the format of {', '.join(map(os.fspath, paths))}: keys seen in the first rows: "
        f"{seen}. Expected one of: webinstruct_cft {{instruction, input, output}}, messages {{messages}} or "
        f"{{conversations}}, triples {{query, response, critique}}, sft {{query|prompt|question|instruction, "
        f"response|output|answer}}. Pass --format explicitly or fix the keys."
    )
  majority = [name for name in FORMATS if 2 * votes[name] >= examined]
  best = majority[0] if majority else max(FORMATS, key=lambda name: (votes[name], -FORMATS.index(name)))
  return FormatDetection(format=best, rows_examined=examined, votes=dict(votes))


# ----------------------------------------------------------------------------- records


def iter_located_records(
    paths: Iterable[str | os.PathLike], format_name: str, skip_invalid: bool = False, report: SkipReport | None = None
) -> Iterator[tuple[RowRef, Record]]:
  """Yields (ref, canonical record) for every row of every file, in order.

  Without skip_invalid the first bad row raises InvalidRow; with it, bad rows are
  counted in `report` (required then) and skipped. File-level errors always raise.
  """
  if format_name not in PARSERS:
    raise ValueError(
        f"unknown format {format_name!r}; expected one of {FORMATS} " "(resolve 'auto' with detect_format first)"
    )
  if skip_invalid and report is None:
    raise ValueError("skip_invalid needs a SkipReport to record what was skipped")
  for path in paths:
    for ref, row in iter_raw_rows(path):
      try:
        if isinstance(row, InvalidRow):
          raise InvalidRow(row.ref, row.reason, row.detail, format_name)
        record = parse_row(row, format_name, ref)
      except InvalidRow as error:
        if not skip_invalid:
          raise
        report.add(error)
        continue
      yield ref, record


def iter_records(
    paths: Iterable[str | os.PathLike], format_name: str, skip_invalid: bool = False, report: SkipReport | None = None
) -> Iterator[Record]:
  """Canonical records of all rows; see iter_located_records."""
  for _, record in iter_located_records(paths, format_name, skip_invalid, report):
    yield record


# ----------------------------------------------------------------------------- splits


def split_fraction_point(record: Mapping[str, str]) -> float:
  """A stable number in [0, 1) from the record's query.

  Hashing the query alone keeps every row of one question in the same split, so
  validation questions are never trained on. sha256, not hash(): stable across runs.
  """
  digest = hashlib.sha256(record["query"].encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(record: Mapping[str, str], validation_fraction: float) -> str:
  """ "validation" for about `validation_fraction` of distinct queries, else "train"."""
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
  return "validation" if split_fraction_point(record) < validation_fraction else "train"


def sha256_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
