"""The base pool: fresh problems (none of the arms' or the test split's), partly noisy solutions."""

import dataclasses

from cftjax.data import demo_task, tfds_builder
from cftjax.experiment import base_data

DEMO = demo_task.DemoConfig(seed=7, num_train=300, num_validation=20, num_test=40)


def test_base_pool_is_disjoint_from_arm_training_and_test_problems():
  base = base_data.base_records(DEMO, num_problems=200, error_fraction=0.3)
  splits = demo_task.generate_splits(DEMO)
  base_queries = {r["query"] for r in base}
  assert len(base_queries) == 200
  for split in ("train", "validation", "test"):
    assert not base_queries & {r["query"] for r in splits[split]}, split
  # The arms' problems are unchanged by the longer stream the pool is drawn from.
  assert [r["query"] for r in splits["train"]] == [
      r["query"] for r in demo_task.generate_split(base_data.base_pool_config(DEMO, 200, 0.3), "train")[:300]
  ]


def test_base_solutions_are_partly_wrong_in_the_answer_format():
  base = base_data.base_records(DEMO, num_problems=400, error_fraction=0.3)
  wrong = [r for r in base if r["label"] == "wrong"]
  assert 0.2 < len(wrong) / len(base) < 0.4
  for record in base:
    problem = demo_task.parse_query(record["query"])
    answer = demo_task.extract_final_answer(record["response"])
    assert record["response"].startswith("Step 1: ")
    assert (answer == str(problem.answer)) == (record["label"] == "right")


def test_base_dataset_holds_solutions_and_check_practice(tmp_path):
  assert base_data.prepare_base_dataset(tmp_path, DEMO, 50, 0.3, practice_per_problem=2)
  rows = [
      *tfds_builder.load_split(base_data.DATASET_NAME, tmp_path, "train"),
      *tfds_builder.load_split(base_data.DATASET_NAME, tmp_path, "validation"),
  ]
  solutions = [r for r in rows if r["response"].startswith("Step 1: ")]
  practice = [r for r in rows if r["response"].startswith("Check: ")]
  assert (len(solutions), len(practice), len(rows)) == (50, 100, 150)
  assert {r["query"] for r in solutions} == {r["query"] for r in base_data.base_records(DEMO, 50, 0.3)}
  assert not base_data.prepare_base_dataset(tmp_path, DEMO, 50, 0.3, practice_per_problem=2)  # reused
  assert base_data.prepare_base_dataset(tmp_path, DEMO, 50, 0.3, practice_per_problem=1)  # rebuilt


def test_base_dataset_is_built_once_and_rebuilt_for_other_settings(tmp_path):
  assert base_data.prepare_base_dataset(tmp_path, DEMO, 100, 0.3)
  train = tfds_builder.load_split(base_data.DATASET_NAME, tmp_path, "train")
  validation = tfds_builder.load_split(base_data.DATASET_NAME, tmp_path, "validation")
  assert (len(train), len(validation)) == (98, 2)
  assert train[0]["objective"] == "sft"
  assert not base_data.prepare_base_dataset(tmp_path, DEMO, 100, 0.3)  # reused
  assert base_data.prepare_base_dataset(tmp_path, dataclasses.replace(DEMO, seed=8), 100, 0.3)
