"""Evaluations that plug into the training loop (`train.run(..., evaluators=[...])`).

An evaluator is called at each evaluation step with the live model and parameters and
returns named metrics; they are logged with the validation loss and can rank checkpoints
through `checkpoint.best_metric` (e.g. "val_math500_accuracy", best_mode "max"). The loop
knows nothing about generation or grading: it only calls what it is given (and this module
imports cftjax.evaluate only when an evaluator runs, so the loop never loads it).
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections


@dataclasses.dataclass(frozen=True)
class EvalContext:
  model: Any
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: Any
  mesh: jax.sharding.Mesh
  step: int


Evaluator = Callable[[EvalContext], dict]


def _loaded(ctx: EvalContext):
  from cftjax import evaluate

  return evaluate.LoadedModel(ctx.model, ctx.params, ctx.config, ctx.tokenizer, ctx.mesh)


@dataclasses.dataclass(frozen=True)
class DemoGeneration:
  """Greedy answer and critique accuracy on the first `examples` demo validation problems."""

  examples: int
  max_new_tokens: int

  def __call__(self, ctx: EvalContext) -> dict:
    from cftjax import evaluate

    return evaluate.demo_generation_metrics(
        ctx.model, ctx.params, ctx.config, ctx.tokenizer, ctx.mesh, self.examples, self.max_new_tokens
    )


@dataclasses.dataclass(frozen=True)
class MathBenchmark:
  """Greedy accuracy on the first `examples` problems of a math JSONL benchmark (any data
  source): metric `val_<name>_accuracy`."""

  path: str
  examples: int
  max_new_tokens: int
  batch_size: int = 32

  @property
  def name(self) -> str:
    return benchmark_name(self.path)

  def __call__(self, ctx: EvalContext) -> dict:
    from cftjax import evaluate

    loaded = _loaded(ctx)
    sampling = evaluate.sampling_for(loaded, self.max_new_tokens)
    _, summary = evaluate.run_math(loaded, self.path, sampling, self.batch_size, self.examples or None, progress=False)
    return {f"val_{self.name}_accuracy": summary["accuracy"]}


def benchmark_name(path: str) -> str:
  """A benchmark's name: its file stem (math500.jsonl -> math500)."""
  return Path(path).name.split(".")[0]


def from_config(config: ml_collections.ConfigDict) -> list[Evaluator]:
  """train.eval_generation_examples (demo) and train.eval_math_data (any source)."""
  train = config.train
  out: list[Evaluator] = []
  max_new = int(train.get("eval_generation_max_new_tokens", 384))
  if int(train.get("eval_generation_examples", 0)) > 0:
    if config.data.source != "demo":
      raise ValueError(
          "config key train.eval_generation_examples > 0 needs data.source=demo; for other data "
          "set train.eval_math_data to math benchmark files"
      )
    out.append(DemoGeneration(int(train.eval_generation_examples), max_new))
  for path in [p for p in str(train.get("eval_math_data", "")).split(",") if p]:
    if not Path(path).is_file():
      raise FileNotFoundError(f"config key train.eval_math_data: {path} does not exist")
    out.append(MathBenchmark(path, int(train.get("eval_math_examples", 0)), max_new))
  return out
