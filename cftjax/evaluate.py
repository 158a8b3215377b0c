"""Evaluation from checkpoints: load onto the present devices, generate, grade, report.

Tasks
  demo      the embedded demo's test split: direct-answer accuracy (query -> answer) and
            critique accuracy (query + noisy response -> verdict)
  math      a JSONL benchmark; the paper's prompt; last \\boxed{} / "the answer is" /
            last number; equivalence through math-verify
  critique  (query, response, label) rows: the model critiques in the CFT format; accuracy,
            precision / recall / F1 for finding wrong responses, unparseable share
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections

from cftjax import chat_templates, checkpoint, grading, objectives, sharding
from cftjax.chat_templates import Turn
from cftjax.generate import SamplingConfig, generate
from cftjax.model import ModelConfig, Transformer, params_init_fn

TASKS = ("demo", "math", "critique")


@dataclasses.dataclass
class LoadedModel:
  model: Transformer
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: Any
  mesh: jax.sharding.Mesh
  checkpoint_dir: Path | None = None  # where it was loaded from (None: a model in training)


def load(
    checkpoint_dir: str | Path,
    step: int | None = None,
    mesh_config=None,
    devices: Sequence[jax.Device] | None = None,
    dtype: str | None = None,
) -> LoadedModel:
  """Restores params onto a mesh over `devices` (default: all present), whatever mesh
  trained them; `mesh_config` defaults to pure data parallelism (fsdp / tensor shard the
  weights, e.g. a 7B model over 8 chips). `dtype` (e.g. "bfloat16") is the inference
  dtype: weights are restored in it and the model computes in it (half the memory of
  float32 master weights)."""
  from cftjax.data import sources
  from cftjax.data import tokenizer as tokenizer_lib

  checkpoint_dir = Path(checkpoint_dir)
  mesh = sharding.make_mesh(mesh_config or ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}), devices)

  def with_dtype(config):
    if dtype:
      config.model.dtype = config.model.param_dtype = dtype
    return config

  def target_for(config):
    model = Transformer(ModelConfig.from_config(with_dtype(config).model))
    return sharding.with_shardings(*sharding.abstract_params_and_shardings(params_init_fn(model), mesh))

  config, params = checkpoint.load_checkpoint(checkpoint_dir, target_for, step)
  config = with_dtype(config)
  model = Transformer(ModelConfig.from_config(config.model))
  tokenizer = tokenizer_lib.load_tokenizer(sources.tokenizer_path(config.data, checkpoint_dir=checkpoint_dir))
  return LoadedModel(model, params, config, tokenizer, mesh, checkpoint_dir)


# ------------------------------------------------------------------------------ prompts
def _prompt(context: Sequence[Turn], loaded: LoadedModel) -> list[int]:
  data = loaded.config.data
  return chat_templates.prompt_ids(context, data.chat_template, loaded.tokenizer, data.get("system_prompt") or None)


def answer_prompt(question: str, loaded: LoadedModel, system: str = "") -> list[int]:
  context = ([Turn("system", system)] if system else []) + [Turn("user", question)]
  return _prompt(context, loaded)


def critique_prompt(question: str, response: str, loaded: LoadedModel) -> list[int]:
  return _prompt([Turn("user", objectives.cft_user_text(question, response))], loaded)


def generate_texts(
    loaded: LoadedModel, prompts: list[list[int]], sampling: SamplingConfig, batch_size: int, progress: bool
) -> list[str]:
  """Generated texts for token prompts, batched with the KV cache on the loaded model's mesh."""
  outputs = generate(
      loaded.model,
      loaded.params,
      prompts,
      sampling,
      batch_size=batch_size,
      mesh=loaded.mesh,
      progress=progress,
      decode=loaded.tokenizer.decode,
  )
  return [loaded.tokenizer.decode(ids) for ids in outputs]


def sampling_for(
    loaded: LoadedModel, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
) -> SamplingConfig:
  stop_ids = tuple(getattr(loaded.tokenizer, "stop_ids", ()) or (loaded.tokenizer.eos_id,))
  for special in ("<|im_end|>", "<|eot_id|>"):
    token = loaded.tokenizer.token_to_id(special)
    if token is not None and token not in stop_ids:
      stop_ids += (token,)
  template = loaded.config.data.get("chat_template", "plain")
  stop_ids += tuple(t for t in chat_templates.end_of_turn_ids(template, loaded.tokenizer) if t not in stop_ids)
  return SamplingConfig(
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      seed=seed,
      eos_ids=stop_ids,
      pad_id=loaded.tokenizer.pad_id,
  )


# ------------------------------------------------------------------------------ tasks
def critique_rows(examples: Sequence[dict], outputs: Sequence[str]) -> tuple[list[dict], dict]:
  verdicts = [grading.parse_verdict(o) for o in outputs]
  rows = [dict(ex, output=o, verdict=v, correct=v == ex["label"]) for ex, o, v in zip(examples, outputs, verdicts)]
  return rows, grading.critique_scores(verdicts, [ex["label"] for ex in examples])


def answer_rows(examples: Sequence[dict], outputs: Sequence[str]) -> tuple[list[dict], dict]:
  rows = []
  for ex, output in zip(examples, outputs):
    predicted = grading.extract_answer(output)
    rows.append(dict(ex, output=output, extracted=predicted, correct=grading.answers_match(predicted, ex["answer"])))
  return rows, grading.math_scores([r["correct"] for r in rows])


def run_demo(
    loaded: LoadedModel,
    sampling: SamplingConfig,
    batch_size: int,
    limit: int | None,
    progress: bool = True,
    split: str = "test",
) -> tuple[dict[str, list[dict]], dict]:
  from cftjax.data import sources

  records = sources.demo_eval_records(loaded.config.data, split, loaded.checkpoint_dir)[:limit]
  answer_examples = [{"id": i, "question": r["query"], "answer": r["answer"]} for i, r in enumerate(records)]
  answer_out = generate_texts(
      loaded, [answer_prompt(r["query"], loaded) for r in records], sampling, batch_size, progress
  )
  answers, answer_summary = answer_rows(answer_examples, answer_out)
  critique_examples = [
      {"id": i, "question": r["query"], "response": r["response"], "label": r["label"]} for i, r in enumerate(records)
  ]
  critique_out = generate_texts(
      loaded, [critique_prompt(r["query"], r["response"], loaded) for r in records], sampling, batch_size, progress
  )
  critiques, critique_summary = critique_rows(critique_examples, critique_out)
  summary = {"answer_accuracy": answer_summary["accuracy"], **{f"critique_{k}": v for k, v in critique_summary.items()}}
  summary.update(demo_verdicts_by_error_kind(records, critiques))
  return {"answers": answers, "critiques": critiques}, summary


def demo_verdicts_by_error_kind(records: Sequence[dict], critiques: Sequence[dict]) -> dict[str, float]:
  """Share of right verdicts per kind of response: right ones accepted, and wrong ones
  caught per kind of their first error (what the critic can and cannot check)."""
  from cftjax.data import demo_task

  hits: dict[str, list[bool]] = {}
  for record, row in zip(records, critiques):
    kind = demo_task.error_kind(record["query"], record["response"]) or "right"
    hits.setdefault(kind, []).append(bool(row["correct"]))
  order = ["right", *demo_task.ERROR_KINDS]
  return {f"critique_accuracy_{kind}": sum(hits[kind]) / len(hits[kind]) for kind in order if kind in hits}


def sampled_answer_rows(examples: Sequence[dict], outputs: Sequence[Sequence[str]]) -> tuple[list[dict], dict]:
  """n outputs per example: accuracy (mean over samples), unbiased pass@k, majority vote."""
  from cftjax import sample_scores

  n = len(outputs[0])
  rows = []
  for ex, outs in zip(examples, outputs):
    extracted = [grading.extract_answer(o) for o in outs]
    correct = [grading.answers_match(a, ex["answer"]) for a in extracted]
    majority = sample_scores.majority_answer(extracted, grading.answers_match)
    rows.append(
        dict(
            ex,
            outputs=list(outs),
            extracted=extracted,
            correct=correct,
            majority=majority,
            majority_correct=grading.answers_match(majority, ex["answer"]),
        )
    )
  summary = {"accuracy": sum(sum(r["correct"]) for r in rows) / (n * len(rows)), "n": len(rows), "samples": n}
  for k in sample_scores.default_ks(n):
    summary[f"pass@{k}"] = sum(sample_scores.pass_at_k(n, sum(r["correct"]), k) for r in rows) / len(rows)
  summary[f"maj@{n}"] = sum(r["majority_correct"] for r in rows) / len(rows)
  return rows, summary


def run_math(loaded: LoadedModel, data_path: str, sampling, batch_size, limit, progress=True, num_samples: int = 1):
  """Accuracy on a math benchmark; with num_samples > 1 (and temperature > 0), n answers
  per problem, pass@k and majority-vote accuracy."""
  from cftjax import eval_data

  examples = eval_data.load_eval_file(data_path, "math")[:limit]
  prompts = [
      answer_prompt(eval_data.math_user_text(e.question), loaded, eval_data.MATH_SYSTEM_PROMPT) for e in examples
  ]
  refs = [{"id": e.id, "question": e.question, "answer": e.reference} for e in examples]
  if num_samples == 1:
    rows, summary = answer_rows(refs, generate_texts(loaded, prompts, sampling, batch_size, progress))
    return {"math": rows}, summary
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples} must be >= 1")
  repeated = [p for p in prompts for _ in range(num_samples)]  # each copy gets its own sampling key
  flat = generate_texts(loaded, repeated, sampling, batch_size, progress)
  outputs = [flat[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
  rows, summary = sampled_answer_rows(refs, outputs)
  return {"math": rows}, summary


def run_critique(loaded: LoadedModel, data_path: str, sampling, batch_size, limit, progress=True):
  from cftjax import eval_data

  examples = eval_data.load_eval_file(data_path, "critique")[:limit]
  prompts = [critique_prompt(e.question, e.response, loaded) for e in examples]
  outputs = generate_texts(loaded, prompts, sampling, batch_size, progress)
  rows, summary = critique_rows(
      [{"id": e.id, "question": e.question, "response": e.response, "label": e.label} for e in examples], outputs
  )
  return {"critiques": rows}, summary


def write_results(out_dir: str | Path, task: str, rows_by_name: dict[str, list[dict]], summary: dict) -> Path:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for name, rows in rows_by_name.items():
    with open(out / f"{task}_{name}.jsonl", "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  (out / f"{task}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return out


def format_summary(task: str, summary: dict) -> str:
  width = max(len(k) for k in summary)
  lines = [f"{task} evaluation", "-" * (width + 14)]
  for key, value in summary.items():
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    lines.append(f"{key:<{width}}  {shown:>10}")
  return "\n".join(lines)


def demo_generation_metrics(model, params, config, tokenizer, mesh, limit: int, max_new_tokens: int = 384) -> dict:
  """In-training generation metric on the demo's validation split (greedy)."""
  loaded = LoadedModel(model, params, config, tokenizer, mesh)
  sampling = sampling_for(loaded, max_new_tokens)
  _, summary = run_demo(loaded, sampling, batch_size=max(limit, 1), limit=limit, progress=False, split="validation")
  return {
      "val_answer_accuracy": summary["answer_accuracy"],
      "val_critique_accuracy": summary["critique_accuracy"],
      "val_critique_f1": summary["critique_f1"],
  }
