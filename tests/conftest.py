"""Test session setup: 8 simulated CPU devices, so mesh tests run on one machine."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Compiling dominates these tiny-model tests; XLA's cheapest backend level cuts it ~3x on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
