"""Raw rows -> canonical records: every format, auto detection, each kind of bad row, splits."""

import json
from pathlib import Path

import pytest

from cftjax import grading
from cftjax.data import records
from cftjax.data.records import InvalidRow, SkipReport

CFT_INSTRUCTION = "Please critique whether the following solution to the question is correct."


def write_jsonl(path: Path, rows) -> str:
  """Rows may be dicts (dumped as JSON) or raw str/bytes lines written as is."""
  with open(path, "wb") as f:
    for row in rows:
      if isinstance(row, bytes):
        f.write(row + b"\n")
      elif isinstance(row, str):
        f.write(row.encode() + b"\n")
      else:
        f.write(json.dumps(row).encode() + b"\n")
  return str(path)


def read_all(paths, format_name, **kwargs):
  return list(records.iter_records(paths, format_name, **kwargs))


def cft_row(i: int = 0, verdict: str = "wrong") -> dict:
  return {
      "instruction": CFT_INSTRUCTION,
      "input": f"Question:\nWhat is {i} + 1?\n\nSolution:\nIt is {i + 2}.",
      "output": f"Critique:\nThe sum is {i + 1}, not {i + 2}.\nConclusion: {verdict}",
  }


def test_every_record_has_exactly_the_canonical_str_keys(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [cft_row()])
  (record,) = read_all([path], "webinstruct_cft")
  assert tuple(sorted(record)) == tuple(sorted(records.CANONICAL_KEYS))
  assert all(isinstance(v, str) for v in record.values())


# ----------------------------------------------------------------------------- formats


def test_webinstruct_cft_splits_question_and_solution_and_strips_critique_prefix(tmp_path):
  path = write_jsonl(tmp_path / "cft.jsonl", [cft_row(3, "wrong")])
  (record,) = read_all([path], "webinstruct_cft")
  assert record == records.make_record(
      objective="cft",
      query="What is 3 + 1?",
      response="It is 5.",
      critique="The sum is 4, not 5.\nConclusion: wrong",
      label="wrong",
  )


def test_webinstruct_cft_without_markers_keeps_whole_prompt_as_query(tmp_path):
  row = {"instruction": "Check this.", "input": "2+2=5", "output": "Wrong.\nConclusion: right"}
  (record,) = read_all([write_jsonl(tmp_path / "a.jsonl", [row])], "webinstruct_cft")
  assert (record["query"], record["response"]) == ("Check this.\n2+2=5", "")
  assert (record["critique"], record["label"]) == ("Wrong.\nConclusion: right", "right")


def test_label_comes_from_the_last_conclusion_and_is_empty_without_one():
  assert records.critique_label("Conclusion: right ... later\nConclusion: Wrong") == "wrong"
  assert records.critique_label("Conclusion: **right**") == "right"
  assert records.critique_label("Looks fine to me.") == ""


def test_label_follows_the_evaluation_verdict_rules():
  """Prepared data and evaluation read a verdict the same way."""
  for critique in (
      "Conclusion: incorrect",
      "Conclusion: Correct",
      "so \\boxed{wrong}",
      "Conclusion: unsure",
      "Conclusion: right\nConclusion: wrong",
      "Conclusion: `right`",
  ):
    assert records.critique_label(critique) == (grading.parse_verdict(critique) or ""), critique
  assert records.critique_label("Conclusion: incorrect") == "wrong"


def test_triples_is_cft_and_takes_optional_label_system_answer(tmp_path):
  rows = [
      {"query": "q", "response": "r", "critique": "Critique:\nok\nConclusion: right"},
      {"query": "q2", "response": "r2", "critique": "c2", "label": "WRONG", "system": "S", "answer": "4"},
  ]
  first, second = read_all([write_jsonl(tmp_path / "t.jsonl", rows)], "triples")
  assert first == records.make_record(
      objective="cft", query="q", response="r", critique="ok\nConclusion: right", label="right"
  )
  assert (second["label"], second["system"], second["answer"]) == ("wrong", "S", "4")


def test_messages_last_assistant_turn_is_target_and_earlier_turns_are_history(tmp_path):
  row = {
      "messages": [
          {"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"},
          {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"},
      ]
  }
  (record,) = read_all([write_jsonl(tmp_path / "m.jsonl", [row])], "messages")
  assert record == records.make_record(
      objective="sft",
      query="2+2?",
      response="4",
      system="Be brief.",
      history=json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
  )


def test_messages_accepts_sharegpt_conversations(tmp_path):
  row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
  (record,) = read_all([write_jsonl(tmp_path / "s.jsonl", [row])], "messages")
  assert (record["query"], record["response"], record["history"], record["system"]) == ("Q", "A", "[]", "")


@pytest.mark.parametrize(
    "turns, detail",
    [
        ([{"role": "user", "content": "Q"}], "must end with an assistant turn"),
        ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}], "must follow a user turn"),
    ],
)
def test_messages_without_a_usable_target_is_bad_turns(tmp_path, turns, detail):
  path = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
  with pytest.raises(InvalidRow, match=detail) as info:
    read_all([path], "messages")
  assert info.value.reason == records.BAD_TURNS


def test_messages_unknown_role_names_the_turn(tmp_path):
  path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
  with pytest.raises(InvalidRow, match=r"m.jsonl:1: messages\[0\].role is 'robot'"):
    read_all([path], "messages")


@pytest.mark.parametrize(
    "row, query, response",
    [
        ({"query": "q", "response": "r"}, "q", "r"),
        ({"prompt": "p", "output": "o"}, "p", "o"),
        ({"question": "What?", "answer": "That."}, "What?", "That."),
        ({"instruction": "Translate.", "input": "Hallo", "output": "Hello"}, "Translate.\nHallo", "Hello"),
        ({"instruction": "Say hi.", "input": "", "output": "Hi"}, "Say hi.", "Hi"),
    ],
)
def test_sft_key_variants(tmp_path, row, query, response):
  (record,) = read_all([write_jsonl(tmp_path / "s.jsonl", [row])], "sft")
  assert record == records.make_record(objective="sft", query=query, response=response)


def test_json_list_files_are_read_like_jsonl(tmp_path):
  path = tmp_path / "rows.json"
  path.write_text(json.dumps([{"query": "a", "response": "b"}, {"query": "c", "response": "d"}]))
  assert [r["query"] for r in read_all([str(path)], "sft")] == ["a", "c"]


def test_blank_lines_and_a_byte_order_mark_are_not_rows(tmp_path):
  path = write_jsonl(
      tmp_path / "a.jsonl", [b"\xef\xbb\xbf" + json.dumps({"query": "q", "response": "r"}).encode(), "", "   "]
  )
  assert len(read_all([path], "sft")) == 1


# ----------------------------------------------------------------------------- auto


@pytest.mark.parametrize(
    "row, expected",
    [
        (cft_row(), "webinstruct_cft"),
        ({"instruction": "Translate.", "input": "Hallo", "output": "Hello"}, "sft"),  # Alpaca: no markers
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "messages"),
        ({"query": "q", "response": "r", "critique": "c"}, "triples"),
        ({"prompt": "p", "response": "r"}, "sft"),
    ],
)
def test_auto_detects_each_format(tmp_path, row, expected):
  detection = records.detect_format([write_jsonl(tmp_path / "a.jsonl", [row] * 3)])
  assert detection.format == expected
  assert detection.describe() == f"detected format '{expected}' (3 of the first 3 rows match)"


def test_auto_keeps_cft_when_some_rows_lack_the_critique(tmp_path):
  rows = [{"query": "q", "response": "r", "critique": "c"}] * 3 + [{"query": "q", "response": "r"}] * 2
  assert records.detect_format([write_jsonl(tmp_path / "a.jsonl", rows)]).format == "triples"


def test_auto_ignores_malformed_rows_and_only_samples_the_first_rows(tmp_path):
  rows = ["{not json", *[{"query": "q", "response": "r"}] * 3, {"unrelated": 1}]
  detection = records.detect_format([write_jsonl(tmp_path / "a.jsonl", rows)], sample_rows=3)
  assert (detection.format, detection.rows_examined) == ("sft", 3)


def test_auto_error_lists_the_keys_seen(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [{"foo": 1, "bar": 2}, {"text": "x"}])
  with pytest.raises(ValueError, match=r"keys seen in the first rows: \['bar', 'foo'\] \(1 rows\); \['text'\]"):
    records.detect_format([path])


# ----------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    # (line content, reason, message after "bad.jsonl:2: ")
    ('{"query": "q", ', records.MALFORMED_JSON, "malformed JSON"),
    ("[1, 2]", records.NOT_AN_OBJECT, "row is a JSON array, not an object"),
    (json.dumps({"query": "q", "response": "r"}), records.MISSING_FIELD, "missing field 'critique' (format triples)"),
    (
        json.dumps({"query": "q", "response": "  ", "critique": "c"}),
        records.EMPTY_FIELD,
        "empty field 'response' (format triples)",
    ),
    (
        json.dumps({"query": "q", "response": None, "critique": "c"}),
        records.EMPTY_FIELD,
        "empty field 'response' (null) (format triples)",
    ),
    (
        json.dumps({"query": "q", "response": 7, "critique": "c"}),
        records.NON_STRING_FIELD,
        "field 'response' is a JSON number, expected a string (format triples)",
    ),
    (
        b'{"query": "q\xff", "response": "r", "critique": "c"}',
        records.BAD_UTF8,
        "invalid UTF-8 at byte offset 12 of the line",
    ),
    (
        json.dumps({"query": "q", "response": "r", "critique": "c", "label": "maybe"}),
        records.BAD_VALUE,
        "field 'label' is 'maybe', expected 'right' or 'wrong'",
    ),
]
GOOD_TRIPLE = {"query": "good", "response": "r", "critique": "c"}


@pytest.mark.parametrize("bad_line, reason, message", BAD_ROWS, ids=[r[1] + str(i) for i, r in enumerate(BAD_ROWS)])
def test_bad_row_raises_with_file_line_and_reason(tmp_path, bad_line, reason, message):
  path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_TRIPLE, bad_line, GOOD_TRIPLE])
  with pytest.raises(InvalidRow) as info:
    read_all([path], "triples")
  error = info.value
  assert (error.path, error.line, error.reason) == (path, 2, reason)
  assert str(error).startswith(f"{path}:2: {message}")


def test_skip_invalid_counts_per_reason_with_first_five_refs(tmp_path):
  lines = [GOOD_TRIPLE] + ["{broken"] * 7 + [{"query": "q", "response": "r"}, "3", GOOD_TRIPLE]
  path = write_jsonl(tmp_path / "bad.jsonl", lines)
  report = SkipReport()
  kept = read_all([path], "triples", skip_invalid=True, report=report)
  assert len(kept) == 2
  assert report.counts == {records.MALFORMED_JSON: 7, records.MISSING_FIELD: 1, records.NOT_AN_OBJECT: 1}
  assert report.total == 9
  malformed_refs = [m.split(": ")[0] for m in report.examples[records.MALFORMED_JSON]]
  assert malformed_refs == [f"{path}:{line}" for line in range(2, 7)]  # first five of lines 2..8
  assert report.examples[records.MISSING_FIELD] == [f"{path}:9: missing field 'critique' (format triples)"]


def test_skip_report_merge_adds_counts_and_caps_examples():
  def report_of(n):
    report = SkipReport()
    for line in range(n):
      report.add(InvalidRow(records.RowRef("f.jsonl", line + 1), records.EMPTY_FIELD, "empty"))
    return report

  merged = report_of(3)
  merged.merge(report_of(4))
  assert merged.counts == {records.EMPTY_FIELD: 7}
  assert len(merged.examples[records.EMPTY_FIELD]) == records.MAX_EXAMPLES_PER_REASON


def test_json_file_rows_are_referenced_by_the_line_they_start_on(tmp_path):
  """As in .jsonl files and eval files: file:line, 1-based."""
  path = tmp_path / "data.json"
  path.write_text(
      "[\n"
      + ",\n".join(json.dumps(r) for r in [GOOD_TRIPLE] * 3)
      + ",\n"
      + json.dumps({"query": "q"}, indent=1)
      + "\n]"
  )
  with pytest.raises(InvalidRow, match=r"data.json:5: missing field 'response'"):
    read_all([str(path)], "triples")


def test_unreadable_json_file_raises_even_when_skipping(tmp_path):
  path = tmp_path / "data.json"
  path.write_text('[\n{"query": "q",\n')
  with pytest.raises(InvalidRow, match=r"data.json:3: malformed JSON"):
    read_all([str(path)], "sft", skip_invalid=True, report=SkipReport())
  path.write_text('{"query": "q", "response": "r"}')
  with pytest.raises(records.InvalidFile, match="must hold a list"):
    read_all([str(path)], "sft")


def test_unsupported_suffix_is_rejected(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("query,response\n")
  with pytest.raises(records.InvalidFile, match="unsupported file type"):
    read_all([str(path)], "sft")


# ----------------------------------------------------------------------------- splits


def test_hash_split_is_stable_and_close_to_the_fraction():
  recs = [records.make_record(query=f"question number {i}") for i in range(4000)]
  first = [records.assign_split(r, 0.1) for r in recs]
  assert first == [records.assign_split(dict(r), 0.1) for r in recs]  # stable across calls
  assert 0.08 < first.count("validation") / len(recs) < 0.12
  # Known value: sha256, not Python's salted hash(), so this holds in every process.
  assert records.split_fraction_point(records.make_record(query="abc")) == pytest.approx(0.728395, abs=1e-6)


def test_hash_split_depends_only_on_the_query():
  a = records.make_record(query="same", response="one", critique="x")
  b = records.make_record(query="same", response="two", critique="y")
  assert records.split_fraction_point(a) == records.split_fraction_point(b)
  assert all(records.assign_split(a, f) == records.assign_split(b, f) for f in (0.1, 0.5, 0.9))


def test_fraction_zero_sends_everything_to_train_and_bad_fraction_is_rejected():
  assert records.assign_split(records.make_record(query="x"), 0.0) == "train"
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    records.assign_split(records.make_record(query="x"), 1.0)
