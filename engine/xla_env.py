"""Process-wide XLA settings the engine uses for speed, and the host's measured matmul peak.

  enable_compilation_cache(directory=None) -> str   the persistent compilation cache, on by
      default in $TENURE_COMPILATION_CACHE or ~/.cache/tenure/xla (a compiled step is reused
      across runs with the same shapes, flags and jaxlib)
  matmul_peak(dtype, n=2048) -> FLOP/s    best of a few jitted n x n x n matmuls on device 0
  host_description() -> str               CPU model and core count (for benchmark records)
"""
from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

DEFAULT_CACHE = Path.home() / ".cache" / "tenure" / "xla"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
    path = Path(directory or os.environ.get("TENURE_COMPILATION_CACHE") or DEFAULT_CACHE).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every executable that took more than half a second to compile (train / eval steps).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Executables with oneDNN fusions cannot be serialised by this jaxlib: they are simply
    # recompiled next time (a warning per compile would say nothing new).
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry.*onednn")
    return str(path)


def cache_entries(directory: str) -> int:
    return sum(1 for _ in Path(directory).glob("*")) if directory and Path(directory).is_dir() else 0


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted [n, n] @ [n, n] products (inputs in `dtype`,
    output in `dtype`), after one warm-up call."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def host_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    return f"{model}, {os.cpu_count()} cores, jax {jax.__version__} on {device.platform}"


# XLA:CPU routes dots through YNNPACK by default, which takes only dots whose left operand
# contracts its last dimension: every weight gradient (x^T @ dy) misses it and falls back to
# a slow loop, ~8x slower than the forward dots in bf16. oneDNN (custom calls + its graph
# fusion of dots) takes every layout, in fp32 and bf16 (AMX). Measured in docs/performance.md.
ONEDNN_OPTIONS = {
    "xla_cpu_experimental_onednn_custom_call": True,
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
}


def compiler_options(platform: str | None = None) -> dict:
    """Per-jit XLA options for the train / eval steps: the oneDNN dot path on CPU (set
    TENURE_XLA_ONEDNN=0 to compile with XLA's defaults); none on GPU / TPU."""
    platform = platform or jax.devices()[0].platform
    if platform != "cpu" or os.environ.get("TENURE_XLA_ONEDNN", "1") == "0":
        return {}
    return dict(ONEDNN_OPTIONS)
