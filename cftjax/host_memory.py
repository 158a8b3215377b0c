"""Keeps an XLA:CPU step's scratch memory allocated from one step to the next.

XLA:CPU allocates each execution's temporary buffer (534 MB for the demo's 16 x 256 train
step) with malloc and frees it when the step ends. glibc serves a block that large with a
fresh mmap and returns it with munmap, so every step faults the whole buffer in again, one
zeroed 4 KiB page at a time: ~139,000 page faults and ~300 ms of kernel time per ~800 ms
demo step on 2 cores. Running single-device computations on the calling thread puts that
buffer in glibc's main arena, and telling malloc not to mmap and not to trim keeps it there
for the next step. Freed host memory then stays with the process (up to 2 GiB of free heap
top) instead of returning to the OS, which suits a process that runs one step shape for
its whole life. Multi-device CPU computations still run on XLA's worker threads.
"""

import ctypes
import ctypes.util
import functools
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_MAX_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


@functools.cache
def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # absent from musl and other C libraries
  except (OSError, AttributeError):
    return None
  return libc


def keep_step_memory() -> bool:
  """On the CPU backend with glibc, keeps freed step memory for reuse (see the module doc);
  returns whether it did. Call before jax runs its first computation: the CPU client reads
  its dispatch mode when it is created. No effect on GPU or TPU backends."""
  import jax

  libc = _glibc()
  if libc is None:  # without mallopt, inline dispatch would only cost its overlap
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # only the CPU client reads it
  if jax.default_backend() != "cpu":
    return False
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _MAX_TRIM_THRESHOLD))
