"""How the `tenure` process's malloc treats large freed blocks, set once at start-up.

XLA:CPU allocates each step's outputs and temporaries with malloc and frees them when the
step ends. glibc serves a block above its mmap threshold (at most 32 MB), and any block a
worker thread's arena cannot hold (64 MB), with a fresh mmap that free() hands back to the
kernel, so every step faults those pages in again: about 47,000 page faults per MiniLM step at
the quickstart's shapes, a tenth of the step (docs/performance.md). With one arena, no
mmap'd chunks and no trimming, freed blocks stay in the process and the next step reuses
them; the price is that the process keeps its peak heap until it exits (its peak RSS is
what it was).

Applied only where the train step runs on the host CPU (no GPU or TPU device nodes, or
JAX_PLATFORMS=cpu), only with glibc, and before JAX starts its threads (a thread keeps the
arena it first allocated from). TENURE_MALLOC_TUNING=0 leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def _host_runs_the_step() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


TUNED = False  # set by keep_freed_memory(); benchmark records say which malloc they ran with


def keep_freed_memory() -> bool:
    """Set the malloc options above; True (and TUNED) when they were set."""
    global TUNED
    if os.environ.get("TENURE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not _host_runs_the_step():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # only glibc has these options
    except (OSError, AttributeError):
        return False
    options = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    TUNED = all(libc.mallopt(option, value) == 1 for option, value in options)
    return TUNED
