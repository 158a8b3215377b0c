"""One model on the held-out test problems: direct answers, critiques of others' responses,
and critiques of its own answers.

Generation is passed in as `generate_texts(prompts, max_new_tokens) -> texts`, so the
scoring here is a pure function of what the model wrote (a stub stands in for the model in
tests). Self-critique labels come from grading the model's own answer against the true
answer (evaluate.answer_rows, i.e. cftjax.grading), never from anything a critique says.
"""

from typing import Callable, Sequence

from cftjax import evaluate

GenerateTexts = Callable[[list, int], list[str]]


def self_critique_examples(answer_rows: Sequence[dict]) -> list[dict]:
  """Critique examples of the model's own answers, labelled by how they were graded."""
  return [
      {
          "id": row["id"],
          "question": row["question"],
          "response": row["output"],
          "label": "right" if row["correct"] else "wrong",
      }
      for row in answer_rows
  ]


def evaluate_model(
    records: Sequence[dict],
    answer_prompt: Callable[[str], object],
    critique_prompt: Callable[[str, str], object],
    generate_texts: GenerateTexts,
    answer_max_new_tokens: int,
    critique_max_new_tokens: int,
) -> tuple[dict[str, list[dict]], dict]:
  """(rows by part, summary) for demo test CFT `records` (query, response, label, answer).

  summary: {"answer": {accuracy, n, correct}, "critique": critique_scores of the verdicts
  on the records' responses, "self_critique": critique_scores of the verdicts on its own
  answers}.
  """
  if not records:
    raise ValueError("evaluate_model: no test records")
  answer_examples = [{"id": i, "question": r["query"], "answer": r["answer"]} for i, r in enumerate(records)]
  answer_out = generate_texts([answer_prompt(r["query"]) for r in records], answer_max_new_tokens)
  answers, answer_summary = evaluate.answer_rows(answer_examples, answer_out)

  critique_examples = [
      {"id": i, "question": r["query"], "response": r["response"], "label": r["label"]} for i, r in enumerate(records)
  ]
  critique_out = generate_texts([critique_prompt(r["query"], r["response"]) for r in records], critique_max_new_tokens)
  critiques, critique_summary = evaluate.critique_rows(critique_examples, critique_out)

  own = self_critique_examples(answers)
  self_out = generate_texts([critique_prompt(e["question"], e["response"]) for e in own], critique_max_new_tokens)
  self_critiques, self_summary = evaluate.critique_rows(own, self_out)
  rows = {"answers": answers, "critiques": critiques, "self_critiques": self_critiques}
  return rows, {"answer": answer_summary, "critique": critique_summary, "self_critique": self_summary}


def model_generator(loaded: evaluate.LoadedModel, batch_size: int, progress: bool) -> GenerateTexts:
  """Greedy batched generation with the KV cache (cftjax.generate) for a loaded model."""

  def generate_texts(prompts: list, max_new_tokens: int) -> list[str]:
    return evaluate.generate_texts(loaded, prompts, evaluate.sampling_for(loaded, max_new_tokens), batch_size, progress)

  return generate_texts


def evaluate_checkpoint(
    checkpoint_dir,
    records: Sequence[dict],
    answer_max_new_tokens: int,
    critique_max_new_tokens: int,
    batch_size: int,
    progress: bool,
    devices=None,
):
  """evaluate_model for the newest checkpoint in a training workdir."""
  loaded = evaluate.load(checkpoint_dir, devices=devices)
  return evaluate_model(
      records,
      answer_prompt=lambda query: evaluate.answer_prompt(query, loaded),
      critique_prompt=lambda query, response: evaluate.critique_prompt(query, response, loaded),
      generate_texts=model_generator(loaded, batch_size, progress),
      answer_max_new_tokens=answer_max_new_tokens,
      critique_max_new_tokens=critique_max_new_tokens,
  )
