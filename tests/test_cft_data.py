"""cft_data: sampled rows, grading, verdict agreement, policies, balance, resume, and the
output read back by prepare_data's auto format.

The student is a tiny random model (the real generate path) or a stub; the teacher is a
stub with planted critiques, so every agreement is known in advance.
"""

import json

import flax.linen as nn
import jax
import pytest

from cftjax import cft_data, checkpoint, evaluate, grading
from cftjax.cft_data import Problem, Selection
from cftjax.data import records, tfds_builder
from cftjax.model import ModelConfig, Transformer, params_init_fn
from configs import base
from random_params import draw_params

tokenizers = pytest.importorskip("tokenizers")

PROBLEMS = [
    {"problem": "What is 40 + 2?", "answer": "42"},
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"problem": "Compute $\\frac{1}{2} + \\frac{1}{2}$.", "solution": "It is $\\boxed{1}$."},
]


def write_problems(path, rows=PROBLEMS):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def tiny_checkpoint(root):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<|endoftext|>"],
      show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator([p.get("problem", p.get("question")) for p in PROBLEMS] * 3, trainer)
  tokenizer_dir = root / "tokenizer"
  tokenizer_dir.mkdir(parents=True)
  tok.save(str(tokenizer_dir / "tokenizer.json"))
  (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  config = base.get_config()
  config.model.update(
      vocab_size=tok.get_vocab_size(),
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      intermediate_size=64,
  )
  config.data.chat_template = "plain"
  model = Transformer(ModelConfig.from_config(config.model))
  params = draw_params(nn.meta.unbox(jax.eval_shape(params_init_fn(model))))
  checkpoint.save_params(root, params, config)
  return root


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  return evaluate.load(tiny_checkpoint(tmp_path_factory.mktemp("tiny")), devices=jax.devices()[:1])


class Planted:
  """Stub student and teacher: responses[(problem index)] and critiques[response] are given."""

  def __init__(self, responses, critiques, fail_after=None):
    self.responses, self.critiques, self.fail_after = responses, critiques, fail_after
    self.sampled, self.critiqued = [], []

  def sample(self, problems, n, seed):
    self.sampled += [p.index for p in problems]
    return [self.responses[p.index][:n] for p in problems]

  def critique(self, pairs):
    if self.fail_after is not None and len(self.critiqued) >= self.fail_after:
      raise KeyboardInterrupt("interrupted")
    self.critiqued += [r for _, r in pairs]
    return [self.critiques[r] for _, r in pairs]


RIGHT, WRONG, NONE = "Looks fine.\nConclusion: right", "Step 1 is off.\nConclusion: wrong", "Hmm."


def read_rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_model_student_samples_n_rows_per_problem_graded_by_the_grader(loaded, tmp_path):
  problems = cft_data.load_problems(write_problems(tmp_path / "p.jsonl"))
  assert [p.reference for p in problems] == ["42", "7", "1"]
  sampler = cft_data.model_sampler(loaded, max_new_tokens=6, temperature=1.0)
  critic = cft_data.model_critic(loaded, max_new_tokens=4)
  summary = cft_data.make_cft_data(
      problems, sampler, critic, tmp_path / "out.jsonl", samples=4, problems_per_batch=3, log=lambda _: None
  )
  ledger = [json.loads(l) for l in cft_data.ledger_path(tmp_path / "out.jsonl").read_text().splitlines()[1:]]
  assert [e["problem"] for e in ledger] == [0, 1, 2] and all(len(e["rows"]) == 4 for e in ledger)
  for entry in ledger:
    assert len({r["response"] for r in entry["rows"]}) > 1  # N samples, not N copies of one
    for row in entry["rows"]:
      assert row["response_correct"] == (
          bool(row["response"]) and grading.answers_match(grading.extract_answer(row["response"]), entry["reference"])
      )
      assert row["critique_verdict"] == (grading.parse_verdict(row["critique"]) if row["critique"] else None)
  assert summary["rows_sampled"] == 12 and summary["problems"] == 3
  kept = summary["rows_sampled"] - summary["empty_responses"] - summary["empty_critiques"]
  assert summary["rows_kept"] == kept == len(read_rows(tmp_path / "out.jsonl"))


def test_agreement_for_planted_right_and_wrong_critiques(tmp_path):
  problems = [Problem(0, "a", "What is 40 + 2?", "42")]
  responses = {
      0: [
          "40 + 2 = 42. The answer is 42.",
          "So \\boxed{42}",
          "The answer is 41.",
          "\\boxed{43}",
          "The answer is 42",
          "The answer is 44",
      ]
  }
  critiques = {
      "40 + 2 = 42. The answer is 42.": RIGHT,
      "So \\boxed{42}": WRONG,  # right response
      "The answer is 41.": WRONG,
      "\\boxed{43}": RIGHT,  # wrong response
      "The answer is 42": NONE,
      "The answer is 44": "Conclusion: **wrong**",
  }
  stub = Planted(responses, critiques)
  summary = cft_data.make_cft_data(
      problems, stub.sample, stub.critique, tmp_path / "o.jsonl", samples=6, log=lambda _: None
  )
  rows = read_rows(tmp_path / "o.jsonl")
  assert [r["response_correct"] for r in rows] == [True, True, False, False, True, False]
  assert [r["critique_verdict"] for r in rows] == ["right", "wrong", "wrong", "right", None, "wrong"]
  assert [r["critique_agrees"] for r in rows] == [True, False, True, False, False, True]
  assert summary["agreement_rate"] == 3 / 6 and summary["verdict_unparseable"] == 1
  assert summary["agreement_on_right_responses"] == 1 / 3 and summary["agreement_on_wrong_responses"] == 2 / 3
  assert rows[0]["instruction"].startswith("Please critique") and rows[0]["output"] == RIGHT
  assert rows[0]["input"] == "Question:\nWhat is 40 + 2?\n\nSolution:\n40 + 2 = 42. The answer is 42."


def policy_fixture():
  """Two problems, 8 samples each: per problem 3 right+agree, 1 right+flawed, 2 wrong+agree,
  1 wrong+flawed, and one duplicate of the first response."""
  responses, critiques = {}, {}
  for p in range(2):
    right = [f"Problem {p}: \\boxed{{42}} way {k}" for k in range(4)]
    wrong = [f"Problem {p}: \\boxed{{{43 + k}}}" for k in range(3)]
    responses[p] = right + wrong + [right[0] + "  "]
    critiques.update({r: RIGHT for r in right[:3]} | {right[3]: WRONG})
    critiques.update({r: WRONG for r in wrong[:2]} | {wrong[2]: RIGHT})
  return [Problem(i, str(i), f"q{i}", "42") for i in range(2)], responses, critiques


@pytest.mark.parametrize(
    "selection, expected",
    [
        (Selection("all"), dict(rows_kept=16, kept_right=10, kept_flawed=4)),
        (Selection("all", dedupe=True), dict(rows_kept=14, kept_right=8, kept_flawed=4, duplicates_dropped=2)),
        (Selection("agreeing"), dict(rows_kept=12, kept_right=8, kept_flawed=0)),
        (Selection("agreeing", dedupe=True), dict(rows_kept=10, kept_right=6, kept_flawed=0)),
        (Selection("flawed_share", flawed_share=0.25, dedupe=True), dict(rows_kept=13, kept_flawed=3)),
        (Selection("flawed_share", flawed_share=0.5, dedupe=True), dict(rows_kept=8, kept_flawed=4)),
        (Selection("flawed_share", flawed_share=0.0), dict(rows_kept=12, kept_flawed=0)),
        (Selection("all", right_ratio=0.5, dedupe=True), dict(rows_kept=12, kept_right=6)),
        (Selection("agreeing", right_ratio=0.25, dedupe=True), dict(rows_kept=5, kept_right=1)),
        (Selection("agreeing", right_ratio=1.0), dict(rows_kept=8, kept_right=8)),
    ],
)
def test_policies_and_balance(tmp_path, selection, expected):
  problems, responses, critiques = policy_fixture()
  stub = Planted(responses, critiques)
  summary = cft_data.make_cft_data(
      problems, stub.sample, stub.critique, tmp_path / "o.jsonl", samples=8, selection=selection, log=lambda _: None
  )
  assert {k: summary[k] for k in expected} == expected
  rows = read_rows(tmp_path / "o.jsonl")
  assert len(rows) == summary["rows_kept"]
  assert sum(r["response_correct"] for r in rows) == summary["kept_right"]
  flawed = sum(r["critique_verdict"] is not None and not r["critique_agrees"] for r in rows)
  assert flawed == summary["kept_flawed"]
  if selection.policy == "agreeing":
    assert all(r["critique_agrees"] for r in rows)
  if selection.dedupe:
    assert all(
        len(set(x)) == len(x) for x in [[r["input"].strip() for r in rows if r["problem_id"] == p] for p in "01"]
    )
  # A duplicate is critiqued once: the teacher never sees the same text twice per problem.
  assert len(stub.critiqued) == 14
  written = json.loads(cft_data.summary_path(tmp_path / "o.jsonl").read_text())
  assert written["rows_kept"] == summary["rows_kept"] and written["policy"] == selection.policy


def test_reselecting_a_finished_run_generates_nothing(tmp_path):
  problems, responses, critiques = policy_fixture()
  stub = Planted(responses, critiques)
  cft_data.make_cft_data(problems, stub.sample, stub.critique, tmp_path / "o.jsonl", samples=8, log=lambda _: None)
  again = Planted(responses, critiques)
  summary = cft_data.make_cft_data(
      problems,
      again.sample,
      again.critique,
      tmp_path / "o.jsonl",
      samples=8,
      selection=Selection("agreeing"),
      log=lambda _: None,
  )
  assert again.sampled == [] and again.critiqued == [] and summary["rows_kept"] == 12


def test_resume_after_an_interruption_writes_no_row_twice(tmp_path):
  problems = [Problem(i, f"p{i}", f"What is {i} + 1?", str(i + 1)) for i in range(5)]
  responses = {i: [f"The answer is {i + 1}.", f"The answer is {i}."] for i in range(5)}
  critiques = {r: RIGHT for rs in responses.values() for r in rs}
  out = tmp_path / "o.jsonl"
  first = Planted(responses, critiques, fail_after=4)  # dies in the third problem's critique
  with pytest.raises(KeyboardInterrupt):
    cft_data.make_cft_data(problems, first.sample, first.critique, out, samples=2, log=lambda _: None)
  ledger = cft_data.ledger_path(out)
  assert len(ledger.read_text().splitlines()) == 1 + 2 and not out.exists()
  with open(ledger, "a") as f:  # and a write torn by the interruption
    f.write('{"problem": 2, "rows": [{"sam')
  second = Planted(responses, critiques)
  summary = cft_data.make_cft_data(problems, second.sample, second.critique, out, samples=2, log=lambda _: None)
  assert second.sampled == [2, 3, 4]
  entries = [json.loads(l) for l in ledger.read_text().splitlines()[1:]]
  assert sorted(e["problem"] for e in entries) == [0, 1, 2, 3, 4]
  rows = read_rows(out)
  assert len(rows) == summary["rows_kept"] == 10
  assert len({(r["problem_id"], r["sample"]) for r in rows}) == 10
  changed = [Problem(0, "p0", "What is 7 + 1?", "8"), *problems[1:]]
  with pytest.raises(ValueError, match=r"problem 0 \('p0'\) differs from the problems file"):
    cft_data.make_cft_data(changed, second.sample, second.critique, out, samples=2, log=lambda _: None)
  with pytest.raises(ValueError, match=r"other settings \(samples: 2 -> 3\)"):
    cft_data.make_cft_data(problems, second.sample, second.critique, out, samples=3, log=lambda _: None)


def test_prepare_data_builds_the_output_unchanged(tmp_path):
  problems, responses, critiques = policy_fixture()
  stub = Planted(responses, critiques)
  out = tmp_path / "cft.jsonl"
  cft_data.make_cft_data(
      problems, stub.sample, stub.critique, out, samples=8, selection=Selection(dedupe=True), log=lambda _: None
  )
  result = tfds_builder.build_dataset(
      inputs=[str(out)], format=records.AUTO, name="made_cft", data_dir=str(tmp_path / "tfds"), validation_fraction=0.0
  )
  assert result.format == "webinstruct_cft" and result.counts["train"] == 14 and result.skipped.total == 0
  built = tfds_builder.load_split("made_cft", tmp_path / "tfds", "train")
  rows = {(r["problem_id"], r["sample"]): r for r in read_rows(out)}
  expected = sorted(
      (f"q{r['problem_id']}", r["input"].split("Solution:\n", 1)[1], r["critique_verdict"]) for r in rows.values()
  )
  got = sorted((_text(x["query"]), _text(x["response"]), _text(x["label"])) for x in built)
  assert got == expected


def _text(value):
  return value.decode() if isinstance(value, bytes) else value


def test_bad_selection_names_the_flag():
  with pytest.raises(ValueError, match=r"--right_ratio=1.5 must be in \[0, 1\]"):
    Selection(right_ratio=1.5)
  with pytest.raises(ValueError, match=r"--policy='some'"):
    Selection("some")


def test_teacher_prompt_fields_are_checked():
  assert cft_data.check_teacher_prompt("Q: {question}\nA: {response}\nRef: {reference}")
  with pytest.raises(ValueError, match=r"\{answer\}"):
    cft_data.check_teacher_prompt("{question} {response} {answer}")
  with pytest.raises(ValueError, match=r"must contain \{response\}"):
    cft_data.check_teacher_prompt("{question}")
  text = cft_data.teacher_user_text(Problem(0, "a", "Q?", "5"), "R.", "{question}|{response}|{reference}")
  assert text == "Q?|R.|5"
