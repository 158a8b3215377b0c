"""keep_step_memory: a step's freed scratch buffer is reused, not faulted in afresh each step.

Each case runs in its own process: the CPU client's dispatch mode and malloc's settings are
per process. Page faults are counted by the kernel, so the test is exact where a timing
would be flaky.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cftjax import host_memory

REPO = Path(__file__).resolve().parent.parent

# A jitted gradient whose saved activations (8 x 8 MiB) make one 64 MiB scratch buffer, past
# glibc's largest mmap threshold (32 MiB): prints whether keep_step_memory applied and the
# page faults per step once the heap has settled (5 steps).
_PROBE = """
import resource, sys
import jax, jax.numpy as jnp
from cftjax import host_memory
applied = host_memory.keep_step_memory() if sys.argv[1] == "keep" else None
def loss(w, x):
  for _ in range(8):
    x = jnp.tanh(x @ w)
  return x.sum()
step = jax.jit(jax.grad(loss))
w, x = jnp.full((256, 256), 1e-3), jnp.ones((8192, 256))
for _ in range(5):
  step(w, x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  step(w, x).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
  # XLA_FLAGS as scripts/train.py runs: the suite's optimization level 0 allocates otherwise.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  applied, faults = proc.stdout.split()
  return applied, float(faults)


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's")
def test_kept_step_memory_is_not_faulted_in_again():
  _, default_faults = _faults_per_step("default")
  if default_faults < 1024:  # 64 MiB is 16,384 pages of 4 KiB, 32 of 2 MiB
    pytest.skip(f"{default_faults:.0f} faults per step: this kernel backs the buffer with huge pages")
  applied, kept_faults = _faults_per_step("keep")
  assert applied == "True"
  assert kept_faults < default_faults / 10
