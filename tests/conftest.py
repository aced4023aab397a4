"""Test session setup: 8 simulated CPU devices, so mesh tests run on one machine."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Compiling dominates these tiny-model tests; XLA's cheapest backend level cuts it ~3x on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# The `tenure` runs the tests start share one compilation cache in the temp directory, not the
# user's ~/.cache (the suite compiles the same tiny and MiniLM steps in many runs).
os.environ.setdefault("TENURE_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), f"tenure-tests-xla-{os.getuid()}"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
