"""Test session setup: 8 simulated CPU devices so sharded code runs on any machine.

XLA reads the flag when JAX initialises its backend, so it is set before any test
imports jax. Tests that need one device build a mesh over jax.devices()[:1].
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    # Tests run tiny models: XLA's CPU backend optimisation costs far more compile time than
    # it saves at run time, and the results do not depend on it.
    + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `configs` package
