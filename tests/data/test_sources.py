"""Named record sources: the mixture spec, the demo sources, prepared TFDS datasets, and the
tokenizer a config resolves to."""

import json

import pytest

from cftjax.data import pipeline
from cftjax.data import sources as sources_lib
from cftjax.data import tfds_builder
from configs import base


def data_config(data_dir, **changes):
  config = base.get_config().data
  config.data_dir = str(data_dir)
  config.update_from_flattened_dict(
      {"demo.num_train": 24, "demo.num_validation": 4, "demo.num_test": 4, "max_length": 256, **changes}
  )
  return config


def test_parse_mixture():
  assert sources_lib.parse_mixture(" a:2, b:0.5 ,c") == [
      sources_lib.MixtureEntry("a", 2.0),
      sources_lib.MixtureEntry("b", 0.5),
      sources_lib.MixtureEntry("c", 1.0),
  ]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("a:x", r"data.mixture: weight 'x' of 'a' is not a number"),
        ("a:0", r"data.mixture: weight of 'a' must be positive"),
        (" , ", r"data.mixture is empty"),
        ("a:1,a:2", r"data.mixture names a source twice"),
    ],
)
def test_bad_mixture_names_the_key(spec, message):
  with pytest.raises(ValueError, match=message):
    sources_lib.parse_mixture(spec)


def test_demo_sources_and_tokenizer(tmp_path):
  config = data_config(tmp_path, mixture="demo_cft:3,demo_sft:1,demo_drill:2,demo_compare:4")
  prepared = sources_lib.prepare(config)
  sources = sources_lib.load_sources(config, "train", prepared)
  assert [(s.name, s.weight, len(s.records)) for s in sources] == [
      ("demo_cft", 3.0, 24),
      ("demo_sft", 1.0, 24),
      ("demo_drill", 2.0, 24),
      ("demo_compare", 4.0, 24 * config.demo.compare_per_problem),
  ]
  assert {r["objective"] for r in sources[0].records} == {"cft"}
  assert {r["objective"] for r in sources[1].records} == {"sft"}
  assert {r["query"].split("\n")[0] for r in sources[2].records} == {"Practice: work out each line."}
  assert all(r["response"].startswith("Check: ") for r in sources[3].records)
  # The same problems in both views.
  assert [r["query"] for r in sources[0].records] == [r["query"] for r in sources[1].records]
  assert len(sources_lib.load_sources(config, "validation", prepared)[0].records) == 4
  assert sources_lib.tokenizer_path(config, prepared) == str(prepared.tokenizer_path)
  config.tokenizer = "/some/tokenizer.model"
  assert sources_lib.tokenizer_path(config, prepared) == "/some/tokenizer.model"


def test_bad_source_config_names_the_key(tmp_path):
  with pytest.raises(ValueError, match=r"data.mixture: 'webinstruct' is not a demo source"):
    sources_lib.load_sources(data_config(tmp_path, mixture="webinstruct:1"), "train")
  with pytest.raises(ValueError, match=r"data.source='hf' is not 'demo' or 'tfds'"):
    sources_lib.prepare(data_config(tmp_path, source="hf"))
  with pytest.raises(ValueError, match=r"data.tokenizer is empty"):
    sources_lib.tokenizer_path(data_config(tmp_path, source="tfds"), None)


def test_prepared_tfds_datasets_mix_into_training_batches(tmp_path):
  def write(name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

  cft = write(
      "cft",
      [
          {
              "query": f"What is {i} + {i}?",
              "response": f"{i + i + i % 2}",
              "critique": f"Checked.\nConclusion: {'right' if i % 2 == 0 else 'wrong'}",
          }
          for i in range(30)
      ],
  )
  sft = write("sft", [{"query": f"What is {i} * 2?", "response": f"{2 * i}"} for i in range(20)])
  data_dir = tmp_path / "tfds"
  tfds_builder.build_dataset([cft], format="triples", name="my_cft", data_dir=data_dir, validation_fraction=0.0)
  tfds_builder.build_dataset([sft], format="sft", name="my_sft", data_dir=data_dir, validation_fraction=0.0)

  demo = sources_lib.prepare(data_config(tmp_path / "demo"))  # any SentencePiece model will do
  config = data_config(data_dir, source="tfds", mixture="my_cft:2,my_sft:1", tokenizer=str(demo.tokenizer_path))
  assert sources_lib.prepare(config) is None
  sources = sources_lib.load_sources(config, "train")
  assert [(s.name, s.weight, len(s.records)) for s in sources] == [("my_cft", 2.0, 30), ("my_sft", 1.0, 20)]
  assert sources[0].records[0]["objective"] == "cft" and sources[1].records[0]["objective"] == "sft"

  ds = pipeline.make_dataset(config, sources, sources_lib.tokenizer_path(config, None), rows=2, train=True)
  stats = [pipeline.batch_stats(b) for b in ds]
  # Weights 2:1 over 30 and 20 examples: the CFT source runs out first, at 30 + 15.
  assert sum(s["examples"] for s in stats) == 45
  with pytest.raises(FileNotFoundError, match="no prepared dataset 'missing'"):
    sources_lib.load_sources(data_config(data_dir, source="tfds", mixture="missing:1"), "train")


def test_a_checkpoints_tokenizer_is_found_beside_it(tmp_path):
  """Evaluation and export resolve a checkpoint's tokenizer the way training resolves data.tokenizer."""
  config = data_config(tmp_path, source="tfds")
  imported = tmp_path / "imported"
  (imported / "tokenizer").mkdir(parents=True)
  assert sources_lib.tokenizer_path(config, checkpoint_dir=imported) == str(imported / "tokenizer")
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "tokenizer").mkdir()
  assert sources_lib.tokenizer_path(config, checkpoint_dir=run / "checkpoints") == str(run / "tokenizer")
  config.tokenizer = "/configured/tokenizer.json"  # data.tokenizer wins
  assert sources_lib.tokenizer_path(config, checkpoint_dir=imported) == "/configured/tokenizer.json"
  with pytest.raises(FileNotFoundError, match=r"no tokenizer for .*bare: its config has no data.tokenizer"):
    sources_lib.tokenizer_path(data_config(tmp_path, source="tfds"), checkpoint_dir=tmp_path / "bare")


def test_evaluation_reads_the_demo_records_a_run_kept(tmp_path):
  config = data_config(tmp_path / "data")
  prepared = sources_lib.prepare(config)
  workdir = tmp_path / "run"
  sources_lib.keep_demo_records(prepared, workdir)
  assert sources_lib.demo_eval_records(config, "test", workdir / "checkpoints") == prepared.records("test", "cft")
  # The data code now builds other records: the run's copy is what its checkpoints are read with.
  kept = workdir / sources_lib.KEPT_DEMO_DIR / "test.cft.jsonl"
  kept.write_text(kept.read_text().splitlines()[0] + "\n")
  assert len(sources_lib.demo_eval_records(config, "test", workdir / "checkpoints")) == 1
  sources_lib.keep_demo_records(prepared, workdir)  # kept once: a resume does not overwrite it
  assert len(sources_lib.demo_eval_records(config, "test", workdir)) == 1
  # Without a kept copy (another run, or the train split) the records come from the data code.
  assert sources_lib.demo_eval_records(config, "test", tmp_path / "other") == prepared.records("test", "cft")
  assert sources_lib.demo_eval_records(config, "train", workdir) == prepared.records("train", "cft")
