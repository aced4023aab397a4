"""Opt-in (TENURE_HOST_MALLOC=reuse): malloc keeps freed blocks for the next step.

XLA:CPU allocates each step's outputs and temporaries with malloc and frees them when the
step ends. glibc serves a block above its mmap threshold (at most 32 MB), and any block a
worker thread's arena cannot hold (64 MB), with a fresh mmap that free() hands back to the
kernel, so every step faults those pages in again (about 47,000 page faults per MiniLM step
at the quickstart's shapes). With one arena, no mmap'd chunks and no trimming, freed blocks
stay in the process and the next step reuses them: MiniLM's quickstart step 0.309 -> 0.276 s,
BERT-base fp32 16 x 128 6.32 -> 5.92 s (docs/performance.md).

Not the default: the heap never shrinks and fragments, so a large step can hold about twice
its memory (GPT-2 124M bf16: peak RSS 5.3 -> 10.5 GB, with some steps slowed by the growth),
which can exhaust a host that the default malloc fits. Applied only where the train step runs
on the host CPU (no GPU / TPU device nodes, or JAX_PLATFORMS=cpu), only with glibc, and at
`tenure` start-up, before JAX starts its threads (a thread keeps the arena it first used).
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
    if os.environ.get("TENURE_HOST_MALLOC") != "reuse" or not sys.platform.startswith("linux"):
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
