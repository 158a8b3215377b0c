"""Build a TFDS ArrayRecord dataset from JSONL and read it back as str records (no TensorFlow)."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import grain
import pytest

from cftjax.data import records, tfds_builder
from cftjax.data.records import InvalidRow


def write_jsonl(path: Path, rows) -> str:
  path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
  return str(path)


def triple(i: int) -> dict:
  verdict = "right" if i % 3 else "wrong"
  return {
      "query": f"Q{i}: what is {i}*2? ünïcode",
      "response": f"{i * 2}",
      "critique": f"Critique:\nChecked.\nConclusion: {verdict}",
  }


def expected_record(i: int) -> dict:
  row = triple(i)
  return records.make_record(
      objective="cft",
      query=row["query"],
      response=row["response"],
      critique=records.strip_critique_prefix(row["critique"]),
      label=records.critique_label(row["critique"]),
  )


def as_sorted(recs):
  return sorted(recs, key=lambda r: r["query"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """200 triples plus two bad rows, hash split 20%, auto format, skipping bad rows."""
  root = tmp_path_factory.mktemp("built")
  rows = (
      [triple(i) for i in range(100)]
      + ["{oops", {"query": "q", "response": "r"}]
      + [triple(i) for i in range(100, 200)]
  )
  source = write_jsonl(root / "cft.jsonl", rows)
  result = tfds_builder.build_dataset(
      [source], format="auto", name="my_cft", data_dir=root / "data", validation_fraction=0.2, skip_invalid=True
  )
  return root, source, result


def test_round_trip_returns_exact_str_records_split_by_hash(built):
  root, _, result = built
  train = tfds_builder.load_split("my_cft", root / "data", "train")
  validation = tfds_builder.load_split("my_cft", root / "data", "validation")
  assert (len(train), len(validation)) == (result.counts["train"], result.counts["validation"])
  assert len(train) + len(validation) == 200
  assert 20 <= len(validation) <= 60  # about 20% of 200
  assert as_sorted(list(train) + list(validation)) == as_sorted(expected_record(i) for i in range(200))
  expected_validation = [
      expected_record(i) for i in range(200) if records.assign_split(expected_record(i), 0.2) == "validation"
  ]
  assert as_sorted(validation) == as_sorted(expected_validation)
  assert all(type(value) is str for value in train[0].values())


def test_record_source_indexing_batch_reads_grain_and_pickle(built):
  root, _, _ = built
  source = tfds_builder.load_split("my_cft", root / "data", "train")
  assert source[-1] == source[len(source) - 1]
  assert source.__getitems__([2, 0]) == [source[2], source[0]]
  with pytest.raises(IndexError, match="out of range"):
    source[len(source)]
  assert list(grain.MapDataset.source(source)[:3]) == [source[0], source[1], source[2]]
  assert pickle.loads(pickle.dumps(source))[5] == source[5]  # Grain workers receive it pickled


def test_metadata_records_format_sources_counts_and_skips(built):
  root, source, result = built
  metadata = tfds_builder.load_metadata("my_cft", root / "data")
  assert metadata["format"] == result.format == "triples"
  assert metadata["format_note"] == "detected format 'triples' (20 of the first 20 rows match)"
  assert metadata["counts"] == result.counts
  assert (metadata["split_mode"], metadata["validation_fraction"]) == ("hash", 0.2)
  (described,) = metadata["sources"]
  assert described["path"] == os.path.abspath(source)
  assert described["sha256"] == hashlib.sha256(Path(source).read_bytes()).hexdigest()
  assert metadata["skipped"]["counts"] == {records.MALFORMED_JSON: 1, records.MISSING_FIELD: 1}
  assert metadata["skipped"]["examples"][records.MISSING_FIELD] == [
      f"{source}:102: missing field 'critique' (format triples)"
  ]


def test_explicit_validation_files_become_the_validation_split(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", [triple(i) for i in range(5)])
  val = write_jsonl(tmp_path / "val.jsonl", [triple(i) for i in range(5, 8)])
  result = tfds_builder.build_dataset([train], "triples", "split_files", tmp_path / "data", validation_inputs=[val])
  assert result.counts == {"train": 5, "validation": 3}
  loaded = tfds_builder.load_split("split_files", tmp_path / "data", "validation")
  assert as_sorted(loaded) == as_sorted(expected_record(i) for i in range(5, 8))
  metadata = tfds_builder.load_metadata("split_files", tmp_path / "data")
  assert [(os.path.basename(s["path"]), s["split"]) for s in metadata["sources"]] == [
      ("train.jsonl", "train"),
      ("val.jsonl", "validation"),
  ]
  with pytest.raises(ValueError, match="not both"):
    tfds_builder.build_dataset(
        [train], "triples", "x", tmp_path / "d2", validation_fraction=0.1, validation_inputs=[val]
    )


def test_bad_row_fails_before_anything_is_written(tmp_path):
  source = write_jsonl(tmp_path / "a.jsonl", [triple(0), {"query": "q", "response": 3, "critique": "c"}])
  with pytest.raises(InvalidRow, match=r"a.jsonl:2: field 'response' is a JSON number"):
    tfds_builder.build_dataset([source], "triples", "bad", tmp_path / "data")
  assert not (tmp_path / "data" / "bad").exists()


def test_existing_dataset_needs_overwrite_which_rebuilds_it(tmp_path):
  source = write_jsonl(tmp_path / "a.jsonl", [triple(0)])
  tfds_builder.build_dataset([source], "triples", "again", tmp_path / "data", validation_fraction=0.0)
  write_jsonl(tmp_path / "a.jsonl", [triple(1), triple(2)])
  with pytest.raises(FileExistsError, match="--overwrite"):
    tfds_builder.build_dataset([source], "triples", "again", tmp_path / "data", validation_fraction=0.0)
  result = tfds_builder.build_dataset(
      [source], "triples", "again", tmp_path / "data", validation_fraction=0.0, overwrite=True
  )
  assert result.counts == {"train": 2, "validation": 0}
  assert len(tfds_builder.load_split("again", tmp_path / "data", "train")) == 2
  assert sorted(os.listdir(tmp_path / "data")) == ["again"]  # no tfds downloads/ left behind


def test_empty_validation_split_is_not_written_and_loading_it_says_so(tmp_path):
  source = write_jsonl(tmp_path / "a.jsonl", [triple(0)])
  tfds_builder.build_dataset([source], "triples", "no_val", tmp_path / "data", validation_fraction=0.0)
  with pytest.raises(KeyError, match=r"has no split 'validation'; it has \['train'\]"):
    tfds_builder.load_split("no_val", tmp_path / "data", "validation")


def test_no_valid_rows_and_bad_names_and_missing_datasets_are_clear_errors(tmp_path):
  bad_only = write_jsonl(tmp_path / "a.jsonl", ["{oops"])
  with pytest.raises(ValueError, match="no valid training rows .* 1 skipped"):
    tfds_builder.build_dataset([bad_only], "sft", "empty", tmp_path / "data", skip_invalid=True)
  with pytest.raises(ValueError, match="lower snake_case"):
    tfds_builder.build_dataset([bad_only], "sft", "My-Data", tmp_path / "data")
  with pytest.raises(FileNotFoundError, match="input file not found"):
    tfds_builder.build_dataset([str(tmp_path / "missing.jsonl")], "sft", "x", tmp_path / "data")
  with pytest.raises(FileNotFoundError, match="no prepared dataset 'absent'"):
    tfds_builder.load_split("absent", tmp_path / "data", "train")
