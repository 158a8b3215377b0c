"""Where metrics go: the console, `metrics.jsonl` and TensorBoard in the workdir; and MFU.

Only process 0 writes. JSONL lines are appended and flushed per step, so a killed run
keeps everything it logged.
"""

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import tqdm

# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices (CPU) report no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return flops
  return None


def train_flops_per_token(model_config, seq_len: int) -> float:
  """6 N (weights, forward + backward) + causal attention scores and values.

  The embedding lookup costs no matmul FLOPs, so its parameters are excluded unless tied
  (then the same matrix is the output head).
  """
  c = model_config
  matmul_params = c.num_params() - (0 if c.tie_embeddings else c.vocab_size * c.hidden_size)
  attention = 6 * c.num_layers * c.num_heads * c.head_dim * seq_len  # 12 L H Dh S / 2 (causal)
  return 6.0 * matmul_params + attention


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int) -> float | None:
  peak = peak_flops_per_device()
  if peak is None:
    return None
  return tokens_per_second * flops_per_token / (peak * num_devices)


class MetricsWriter:

  def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._bar = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def discard_after(self, step: int) -> None:
    """On resume: lines past the restored step move to metrics.discarded.jsonl (kept)."""
    if not self.enabled or not self.path.exists():
      return
    keep, drop = [], []
    for line in self.path.read_text().splitlines():
      try:
        (drop if json.loads(line).get("step", -1) > step else keep).append(line)
      except json.JSONDecodeError:
        drop.append(line)  # a line torn by a kill
    if drop:
      with open(self.path.with_name("metrics.discarded.jsonl"), "a") as f:
        f.write("\n".join(drop) + "\n")
      self.path.write_text("".join(line + "\n" for line in keep))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def start_progress(self, total: int, initial: int, enabled: bool = True) -> None:
    """A bar of optimizer steps (rate, ETA) kept below the log lines, on a terminal only:
    piped or CI logs get the log lines alone."""
    if self.enabled and enabled and sys.stdout.isatty():
      self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", file=sys.stdout, dynamic_ncols=True, leave=False)

  def advance(self, steps: int = 1, loss: float | None = None) -> None:
    if self._bar is not None:
      if loss is not None:
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      self._bar.update(steps)

  def console(self, line: str) -> None:
    if not self.enabled:
      return
    line = f"[{time.strftime('%H:%M:%S')}] {line}"
    if self._bar is not None:
      self._bar.write(line, file=sys.stdout)  # clears the bar, prints, redraws it below
    else:
      print(line, file=sys.stdout, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _plain(value):
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN; keep it readable
  return value


def format_console(step: int, num_steps: int, m: dict[str, Any]) -> str:
  parts = [f"step {step}/{num_steps}", f"loss {m['loss']:.4f}"]
  for name in ("cft", "sft"):
    if m.get(f"tokens_{name}", 0) > 0:
      parts.append(f"{name} {m[f'loss_{name}']:.4f}")
  parts.append(f"lr {m['learning_rate']:.2e}")
  parts.append(f"gnorm {m['grad_norm']:.3f}")
  parts.append(f"tok/s {m['tokens_per_second']:,.0f}")
  parts.append(f"pack {m['nonpad_fraction']:.1%}")
  if m.get("mfu") is not None:
    parts.append(f"mfu {m['mfu']:.1%}")
  return " | ".join(parts)
