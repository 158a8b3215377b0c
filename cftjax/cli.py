"""What the scripts call: one function per command, so scripts stay thin, and `run`, which
turns a user's mistake into one `error: ...` line (exit 2) and leaves bugs their traceback.

A user error is a bad flag or config key or value, a missing file or directory, unreadable
data or checkpoints, or a ValueError that cftjax itself raised about its input. Anything
else is a bug and propagates. `--verbose` shows the traceback of user errors too.
"""

import contextlib
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

from absl import app, flags

from cftjax import host_memory

USER_ERROR_EXIT = 2
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # cftjax/, configs/, scripts/
_OWN_CODE = tuple(str(PACKAGE_ROOT / d) + os.sep for d in ("cftjax", "configs", "scripts"))

flags.DEFINE_bool("verbose", False, "Show the full traceback of user errors (bad flags, config keys, files).")


class UserError(Exception):
  """A mistake in what the user passed; the message says what and where."""


def run(main: Callable[[list[str]], int | None]) -> None:
  """absl's app.run, with flag and config errors and user errors as one line, exit 2."""
  with reporting_user_errors():
    app.run(main, flags_parser=_parse_flags)


def guard(main: Callable[[], int | None]) -> None:
  """`run` for scripts that parse their own arguments (argparse)."""
  with reporting_user_errors():
    sys.exit(main())


def define_config_file(name: str, default: str, help_text: str):
  """config_flags.DEFINE_config_file, which already applies `--config.a.b=v` overrides (and
  fails on a mistyped key) when it is defined, at import time."""
  from ml_collections import config_flags

  with reporting_user_errors():
    try:
      return config_flags.DEFINE_config_file(name, default, help_text)
    except (AttributeError, KeyError) as e:
      raise UserError(unknown_config_key_message(str(e), sys.argv)) from e


@contextlib.contextmanager
def reporting_user_errors():
  """A user error inside becomes `error: <message>` on stderr and exit 2; bugs propagate."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    message = user_error_message(e)
    if message is None:
      raise
    if _verbose(sys.argv):
      traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def _verbose(argv: list[str]) -> bool:
  """Read from argv: the error may come before (or from) flag parsing."""
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(_flag_error_message(str(e))) from e
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.a.b override naming no key
    raise UserError(unknown_config_key_message(str(e), argv)) from e


def _flag_error_message(text: str) -> str:
  """absl's "flag --config.a.b=v: reason" -> "config key a.b=v: reason"."""
  text = text.strip().splitlines()[0]
  match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", text)
  if match:
    key, value, reason = match.groups()
    return f"bad value for config key {key}={value}: {reason}"
  return text


def unknown_config_key_message(text: str, argv: list[str]) -> str:
  """ml_collections says "'num_step'\nDid you mean "num_steps" instead of "num_step"?" about
  one path component; name the whole key the user typed and the key they probably meant."""
  names = re.findall(r"'(\w+)'", text.replace("\\'", "'"))
  overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  bad = names[0] if names else ""
  key = next((k for k in overrides if bad in k.split(".")), None)
  if key is None:
    return f"unknown config key {bad or text.strip()}"
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  message = f"unknown config key {key} (--config.{key})"
  if suggestion:
    parts = key.split(".")
    parts[parts.index(bad)] = suggestion.group(1)
    message += f"; did you mean {'.'.join(parts)}?"
  return message


def user_error_message(error: BaseException) -> str | None:
  """The one line to print for a user error, None for a bug."""
  from cftjax import checkpoint

  if isinstance(error, UserError):
    return str(error)
  if isinstance(error, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)):
    if error.filename and error.strerror:
      return f"{error.filename}: {error.strerror}"
    return str(error)
  if isinstance(error, checkpoint.CheckpointError):
    return str(error)
  if isinstance(error, ValueError) and _raised_by_own_code(error):
    return str(error)
  return None


def _raised_by_own_code(error: BaseException) -> bool:
  """A ValueError raised in cftjax/configs/scripts validates input; one from inside a library
  (jax, numpy) is more likely a bug."""
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and frames[-1].filename.startswith(_OWN_CODE)


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run when the environment describes one (TPU pod slice, or
  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID set by a launcher)."""
  import jax

  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  elif "," in tpu_hosts:
    jax.distributed.initialize()  # Cloud TPU pods describe themselves


def default_workdir(config_filename: str) -> Path:
  return Path("runs") / Path(config_filename.split(":")[0]).stem


def train_main(config, workdir: str | None, config_filename: str) -> None:
  from cftjax import evaluators, train

  config_file = Path(config_filename.split(":")[0])
  if not config_file.is_file():  # config_flags only says so when the config is first used
    raise UserError(f"config file {config_file} does not exist (--config={config_filename})")
  quiet_library_logs()
  maybe_initialize_distributed()
  host_memory.keep_step_memory()
  workdir = Path(workdir) if workdir else default_workdir(config_filename)
  try:
    result = train.run(config, workdir, evaluators=evaluators.from_config(config))
  except train.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {result.final_step}; checkpoints, metrics.jsonl and config.json in {result.workdir}")


def dry_run_main(config, device_memory_gib: float | None = None) -> None:
  from cftjax import memory

  quiet_library_logs()
  capacity = None if device_memory_gib is None else int(device_memory_gib * memory.GIB)
  report = memory.dry_run(config, capacity=capacity)
  print(memory.format_report(report, config))
  if report.fits is False:
    sys.exit(1)


def experiment_main(config, workdir: str | None, config_filename: str) -> None:
  from cftjax import train
  from cftjax.experiment import runner

  quiet_library_logs()
  host_memory.keep_step_memory()
  workdir = Path(workdir) if workdir else default_workdir(config_filename)
  try:
    runner.run_experiment(config, workdir)
  except train.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def quiet_library_logs() -> None:
  """Library INFO logs (orbax, absl) would bury the progress lines users read."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)


def eval_main(flags) -> None:
  import ml_collections

  from cftjax import evaluate, selection

  quiet_library_logs()
  host_memory.keep_step_memory()
  if flags.task in ("math", "critique") and not flags.data:
    raise UserError(f"--task={flags.task} needs --data=FILE.jsonl")
  mesh_config = ml_collections.ConfigDict(
      {"data": -1, "fsdp": flags["mesh.fsdp"].value, "tensor": flags["mesh.tensor"].value}
  )
  max_new = flags.max_new_tokens or (384 if flags.task == "demo" else 2048)
  if flags.num_samples > 1 and flags.temperature == 0:
    raise UserError("--num_samples > 1 needs --temperature > 0 (greedy answers are all the same)")

  def evaluate_one(step, data, out):
    loaded = evaluate.load(flags.checkpoint, step, mesh_config, dtype=flags.dtype or None)
    sampling = evaluate.sampling_for(loaded, max_new, flags.temperature, flags.top_p, flags.seed)
    if flags.task == "demo":
      rows, summary = evaluate.run_demo(loaded, sampling, flags.batch_size, flags.limit)
    elif flags.task == "math":
      rows, summary = evaluate.run_math(
          loaded, data, sampling, flags.batch_size, flags.limit, num_samples=flags.num_samples
      )
    else:
      rows, summary = evaluate.run_critique(loaded, data, sampling, flags.batch_size, flags.limit)
    evaluate.write_results(out, flags.task, rows, summary)
    return summary

  if flags.steps:
    if flags.task != "math":
      raise UserError("--steps scores math benchmarks: use it with --task=math")
    steps = None if flags.steps == "all" else [int(s) for s in flags.steps.split(",")]
    table = selection.sweep(flags.checkpoint, flags.data.split(","), evaluate_one, flags.select_by, steps)
    out = selection.eval_dir(flags.checkpoint)
    print(selection.table_markdown(table))
    print(f"table.md and table.json in {out}")
    return
  if flags.task != "demo" and "," in flags.data:
    raise UserError("several --data files need --steps (e.g. --steps=all)")
  out = Path(flags.out) if flags.out else Path(flags.checkpoint) / "eval" / flags.task
  summary = evaluate_one(flags.step, flags.data, out)
  print(evaluate.format_summary(flags.task, summary))
  print(f"per-example results and {flags.task}_summary.json in {out}")


def make_cft_data_main(flags) -> None:
  """Loads the student (and the teacher, unless it is the same checkpoint) and runs cft_data."""
  from cftjax import cft_data, evaluate

  quiet_library_logs()
  selection = cft_data.Selection(flags.policy, flags.flawed_share, flags.right_ratio, flags.dedupe, flags.seed)
  teacher_prompt = flags.teacher_prompt
  if teacher_prompt and teacher_prompt.startswith("@"):
    teacher_prompt = Path(teacher_prompt[1:]).read_text(encoding="utf-8")
  if teacher_prompt:
    cft_data.check_teacher_prompt(teacher_prompt)
  problems = cft_data.load_problems(flags.problems, flags.limit)
  student = evaluate.load(flags.student)
  same = Path(flags.teacher).resolve() == Path(flags.student).resolve()
  teacher = student if same else evaluate.load(flags.teacher)
  print(
      f"{len(problems)} problems from {flags.problems}; {flags.samples} samples each; "
      f"teacher {'= student' if same else flags.teacher}"
  )
  teacher_max_new = flags.teacher_max_new_tokens or flags.max_new_tokens
  sampler = cft_data.model_sampler(student, flags.max_new_tokens, flags.temperature, flags.top_p, flags.batch_size)
  critic = cft_data.model_critic(
      teacher,
      teacher_max_new,
      teacher_prompt or None,
      flags.teacher_temperature,
      flags.top_p,
      flags.seed,
      flags.batch_size,
  )
  settings = {
      "problems": str(Path(flags.problems).resolve()),
      "student": str(Path(flags.student).resolve()),
      "teacher": str(Path(flags.teacher).resolve()),
      "max_new_tokens": flags.max_new_tokens,
      "teacher_max_new_tokens": teacher_max_new,
      "temperature": flags.temperature,
      "top_p": flags.top_p,
      "teacher_temperature": flags.teacher_temperature,
      "teacher_prompt": teacher_prompt or None,
  }
  per_batch = max(1, flags.batch_size // flags.samples)
  summary = cft_data.make_cft_data(
      problems, sampler, critic, flags.out, flags.samples, selection, settings, flags.seed, per_batch
  )
  print(json.dumps(summary, indent=2))
  print(f"wrote {summary['rows_kept']} rows to {flags.out}; summary in {cft_data.summary_path(flags.out)}")


def compare_main(run_dirs, out_dir: str) -> None:
  from cftjax import selection

  result = selection.compare(run_dirs, out_dir)
  print((Path(out_dir) / "compare.md").read_text())
  print(f"compare.md, compare.json and accuracy_vs_step.png in {out_dir} ({len(result['runs'])} runs)")
