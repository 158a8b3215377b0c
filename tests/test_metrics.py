"""Where metrics go (metrics.jsonl, TensorBoard, console) and the FLOP/MFU arithmetic."""

import io
import json
import re
import struct
import sys

import pytest

from cftjax import metrics as metrics_lib
from cftjax.model import ModelConfig


def read_scalars(tensorboard_dir) -> dict[str, list[tuple[int, float]]]:
  """Scalars from TensorBoard event files (TFRecord framing around Event protos)."""
  from tensorboardX.proto import event_pb2

  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_jsonl_lines_per_step_and_tensorboard_scalars(tmp_path):
  writer = metrics_lib.MetricsWriter(tmp_path)
  writer.write(1, {"loss": 2.5, "grad_norm": 1.0})
  writer.write(2, {"loss": float("nan"), "mfu": None})
  # Lines are on disk before close: a killed run keeps what it logged.
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 2.5, "grad_norm": 1.0}, {"step": 2, "loss": "nan", "mfu": None}]
  writer.close()
  scalars = read_scalars(tmp_path / "tensorboard")
  assert scalars["loss"] == [(1, 2.5)]  # NaN and None stay out of TensorBoard
  assert scalars["grad_norm"] == [(1, 1.0)]


def test_discard_after_moves_later_lines_aside(tmp_path):
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # torn by a kill
  writer.discard_after(2)
  assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
  discarded = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in discarded[:2]] == [3, 4] and discarded[2] == '{"step": 5, "lo'
  writer.write(3, {"loss": 0.5})  # the resumed run appends after the kept lines
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 3, "loss": 0.5}


def test_disabled_writer_writes_nothing(tmp_path, capsys):
  writer = metrics_lib.MetricsWriter(tmp_path / "run", enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.console("hello")
  writer.discard_after(0)
  writer.close()
  assert not (tmp_path / "run").exists()
  assert capsys.readouterr().out == ""


def test_console_line():
  m = {
      "loss": 1.23456,
      "loss_cft": 1.5,
      "tokens_cft": 10.0,
      "loss_sft": 0.0,
      "tokens_sft": 0.0,
      "learning_rate": 3e-4,
      "grad_norm": 0.5,
      "tokens_per_second": 12345.6,
      "nonpad_fraction": 0.95,
      "mfu": None,
  }
  line = metrics_lib.format_console(7, 100, m)
  assert line == "step 7/100 | loss 1.2346 | cft 1.5000 | lr 3.00e-04 | gnorm 0.500 | tok/s 12,346 | pack 95.0%"
  assert metrics_lib.format_console(7, 100, {**m, "mfu": 0.4}).endswith("| mfu 40.0%")


def test_flops_per_token_and_mfu(monkeypatch):
  config = ModelConfig(
      vocab_size=100, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16
  )
  seq = 32
  attention = 6 * 2 * 2 * 4 * seq
  # The input embedding is a lookup, not a matmul; the untied output head is a matmul.
  assert metrics_lib.train_flops_per_token(config, seq) == 6 * (config.num_params() - 100 * 8) + attention
  tied = ModelConfig(**{**config.__dict__, "tie_embeddings": True})
  assert metrics_lib.train_flops_per_token(tied, seq) == 6 * tied.num_params() + attention

  assert metrics_lib.mfu(1000.0, 1e9, 1) is None  # CPU: no known peak

  class FakeDevice:
    device_kind = "TPU v5 lite"

  assert metrics_lib.peak_flops_per_device(FakeDevice()) == 197e12  # not TPU v5p's 459e12
  monkeypatch.setattr(metrics_lib, "peak_flops_per_device", lambda device=None: 100e12)
  assert metrics_lib.mfu(1000.0, 1e10, 2) == pytest.approx(1000 * 1e10 / 200e12)


class _Terminal(io.StringIO):

  def isatty(self) -> bool:
    return True


def test_progress_bar_shows_steps_rate_and_eta_on_a_terminal(tmp_path, monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stdout", terminal)
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  writer.start_progress(total=10, initial=2)  # resumed at step 2
  writer.advance(3, loss=1.25)
  writer.console("step 5/10 | loss 1.2500")
  writer.close()
  out = terminal.getvalue()
  assert "step 5/10 | loss 1.2500\n" in out  # the log line stays whole, on its own line
  # tqdm's bar: steps done/total, elapsed<remaining (the ETA), rate, last logged loss.
  assert re.search(r"5/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(?:k|M)?step/s, loss=1\.2500\]", out), out


@pytest.mark.parametrize("terminal, enabled", [(False, True), (True, False)])
def test_progress_bar_off_when_piped_or_disabled(tmp_path, monkeypatch, terminal, enabled):
  stream = _Terminal() if terminal else io.StringIO()
  monkeypatch.setattr(sys, "stdout", stream)
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  writer.start_progress(total=10, initial=0, enabled=enabled)
  writer.advance(4, loss=1.0)
  writer.console("step 4/10")
  writer.close()
  assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] step 4/10\n", stream.getvalue())
