"""Process-wide XLA settings the engine uses for speed, and the host's measured matmul peak.

  enable_compilation_cache(directory=None) -> str | None   the persistent compilation cache, on
      by default in $TENURE_COMPILATION_CACHE or ~/.cache/tenure/xla (a compiled step is reused
      across runs with the same shapes, flags and jaxlib); TENURE_COMPILATION_CACHE=off: none
  matmul_peak(dtype, n=2048) -> FLOP/s    best of a few jitted n x n x n matmuls on device 0
  host_description() -> str               CPU model and core count (for benchmark records)
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

DEFAULT_CACHE = Path.home() / ".cache" / "tenure" / "xla"
CACHE_MAX_BYTES = 4 << 30


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
    setting = directory or os.environ.get("TENURE_COMPILATION_CACHE") or DEFAULT_CACHE
    if str(setting) == "off":
        return None
    path = Path(setting).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a cache is an optimisation: a run never fails for want of one
        warnings.warn(f"compilation cache {path}: {exc.strerror or exc}; compiling without it")
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # A size cap turns on jax's LRU eviction, and with it a file lock around every read and
    # write: processes sharing the cache (a study's runs, test workers) never read a half-written
    # entry. One cut short by a kill fails to decompress and is recompiled, with a warning.
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
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


# The instruction sets that decide the CPU step's speed (fp32 vector width, bf16 dot products,
# bf16 matrix tiles): a VM's model name alone ("AMD EPYC") does not tell the hosts apart.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def host_description() -> str:
    """CPU model (with family / model number and SPEED_FLAGS, from /proc/cpuinfo), core count, jax
    version and platform: what a benchmark record needs to say which host it came from."""
    model = platform.processor() or platform.machine()
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu if ":" in line)}
        model = fields.get("model name", model)
        if "cpu family" in fields:  # x86
            model += (f" (family {fields['cpu family']} model {fields.get('model', '?')}; "
                      f"{' '.join(f for f in SPEED_FLAGS if f in cpu_flags()) or 'no avx2'})")
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


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's instruction-set flags from /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), ()))


ACCELERATOR_PLATFORMS = ("cuda", "gpu", "rocm", "tpu")


def _accelerator() -> bool:
    """Whether JAX will run on a GPU / TPU: JAX_PLATFORMS names one, or (unset) a GPU plugin or
    libtpu is installed, as jax itself would pick them."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return any(name in platforms for name in ACCELERATOR_PLATFORMS)
    return (importlib.util.find_spec("libtpu") is not None
            or any(True for _ in importlib.metadata.entry_points(group="jax_plugins")))


def auto_compute_dtype() -> str:
    """What `model.dtype: auto` means on this host: bfloat16 where bf16 matmuls run natively (a
    GPU or TPU, or a CPU with AMX-BF16 or AVX512-BF16), float32 on other CPUs, which emulate bf16
    (0.87x fp32 on an AVX2 AMD Zen 3, docs/performance.md). Decided from the environment, not from
    a device: the config is resolved before jax.distributed starts."""
    return "bfloat16" if _accelerator() or cpu_flags() & {"amx_bf16", "avx512_bf16"} else "float32"


def onednn_dots(dtype=jnp.float32) -> bool:
    """Whether the CPU train / eval steps use oneDNN's dots: TENURE_XLA_ONEDNN=1 / 0 forces it;
    by default (auto) for 16-bit compute, and for fp32 only on AVX-512 CPUs. Measured side by side:
    bf16 BERT-base 2.0x (AMD Zen 3) to 3.5x (Xeon, AMX) faster with oneDNN; fp32 1.05x faster on
    the AVX-512 Xeon, but 0.88x on the AVX2 Zen 3, where XLA's default dots are the faster path."""
    forced = os.environ.get("TENURE_XLA_ONEDNN", "auto")
    if forced in ("0", "1"):
        return forced == "1"
    return jnp.dtype(dtype).itemsize == 2 or "avx512f" in cpu_flags()


def compiler_options(platform: str | None = None, dtype=jnp.float32, onednn: bool | None = None) -> dict:
    """Per-jit XLA options for train / eval steps computing in `dtype`: the oneDNN dot path on
    CPU where `onednn_dots` says so (or `onednn` when given); none on GPU / TPU."""
    platform = platform or jax.devices()[0].platform
    use = onednn_dots(dtype) if onednn is None else onednn
    return dict(ONEDNN_OPTIONS) if platform == "cpu" and use else {}
