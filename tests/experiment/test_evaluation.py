"""Scoring of one model's test answers, critiques and self-critiques, with a stubbed model."""

import pytest

from cftjax.experiment import evaluation

RECORDS = [  # the demo test split's shape: query, a noisy response, its true label, the answer
    {
        "query": "Start with 2. Add 3. What is the result?",
        "response": "Step 1: 2 + 3 = 5\nThe answer is 5.",
        "label": "right",
        "answer": "5",
    },
    {
        "query": "Start with 4. Add 1. What is the result?",
        "response": "Step 1: 4 + 1 = 6\nThe answer is 6.",
        "label": "wrong",
        "answer": "5",
    },
    {
        "query": "Start with 3. Multiply by 3. What is the result?",
        "response": "Step 1: 3 * 3 = 9\nThe answer is 9.",
        "label": "right",
        "answer": "9",
    },
    {
        "query": "Start with 7. Subtract 2. What is the result?",
        "response": "Step 1: 7 - 2 = 4\nThe answer is 4.",
        "label": "wrong",
        "answer": "5",
    },
]
# The stub model's own direct answers: right, wrong, wrong, right.
OWN_ANSWERS = {
    RECORDS[0]["query"]: "Step 1: 2 + 3 = 5\nThe answer is 5.",
    RECORDS[1]["query"]: "Step 1: 4 + 1 = 7\nThe answer is 7.",
    RECORDS[2]["query"]: "Step 1: 3 * 3 = 6\nThe answer is 6.",
    RECORDS[3]["query"]: "Step 1: 7 - 2 = 5\nThe answer is 5.",
}


class StubModel:
  """Prompts are tuples; answers come from OWN_ANSWERS, critiques from `critic`."""

  def __init__(self, critic):
    self.critic = critic
    self.calls = []

  def answer_prompt(self, query):
    return ("answer", query)

  def critique_prompt(self, query, response):
    return ("critique", query, response)

  def generate(self, prompts, max_new_tokens):
    self.calls.append((prompts, max_new_tokens))
    return [OWN_ANSWERS[p[1]] if p[0] == "answer" else self.critic(p[1], p[2]) for p in prompts]


def run(stub):
  return evaluation.evaluate_model(
      RECORDS,
      stub.answer_prompt,
      stub.critique_prompt,
      stub.generate,
      answer_max_new_tokens=11,
      critique_max_new_tokens=22,
  )


@pytest.mark.parametrize("said", ["right", "wrong"])
def test_self_critique_labels_come_from_grading_the_own_answer(said):
  """A critic that always says the same verdict, and even asserts a final answer, cannot
  change the labels: those are the grader's verdict on the model's own answers."""
  stub = StubModel(lambda query, response: f"The correct final answer is {response[-2]}.\nConclusion: {said}")
  rows, summary = run(stub)
  own = rows["self_critiques"]
  assert [r["response"] for r in own] == list(OWN_ANSWERS.values())  # it critiques its own answers
  assert [r["label"] for r in own] == ["right", "wrong", "wrong", "right"]
  assert [r["verdict"] for r in own] == [said] * 4
  self_scores = summary["self_critique"]
  assert self_scores["accuracy"] == 0.5
  assert (self_scores["tp"], self_scores["fn"]) == ((2, 0) if said == "wrong" else (0, 2))
  assert summary["answer"] == {"accuracy": 0.5, "n": 4, "correct": 2}


def test_critiques_of_others_are_scored_against_the_records_labels():
  # Says "wrong" exactly when the response's arithmetic is off: a perfect critic.
  def critic(query, response):
    left, op, operand, _, result = response.splitlines()[0].split(": ")[1].split()
    value = {"+": int(left) + int(operand), "-": int(left) - int(operand), "*": int(left) * int(operand)}[op]
    return f"Conclusion: {'right' if value == int(result) else 'wrong'}"

  stub = StubModel(critic)
  rows, summary = run(stub)
  assert [r["response"] for r in rows["critiques"]] == [r["response"] for r in RECORDS]
  assert summary["critique"]["accuracy"] == 1.0 and summary["critique"]["f1"] == 1.0
  assert summary["self_critique"]["accuracy"] == 1.0  # it also catches its own two wrong answers
  # Answers get the answer budget, both critique passes the critique budget.
  assert [n for _, n in stub.calls] == [11, 22, 22]


def test_unparseable_critiques_count_as_errors():
  stub = StubModel(lambda query, response: "no verdict here")
  _, summary = run(stub)
  assert summary["critique"]["accuracy"] == 0.0 and summary["critique"]["unparsed"] == 4
  assert summary["self_critique"]["fn"] == 2  # the two wrong own answers went unflagged


def test_no_records_is_an_error():
  stub = StubModel(lambda q, r: "")
  with pytest.raises(ValueError, match="no test records"):
    evaluation.evaluate_model([], stub.answer_prompt, stub.critique_prompt, stub.generate, 1, 1)
