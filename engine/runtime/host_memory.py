"""On CPU hosts malloc keeps freed step buffers for the next step, until memory runs short.

XLA:CPU allocates each step's outputs and temporaries with malloc and frees them when the
step ends. glibc serves a block above its mmap threshold (at most 32 MB), and any block a
worker thread's arena cannot hold (64 MB), with a fresh mmap that free() hands back to the
kernel, so every step faults those pages in again (about 47,000 page faults per MiniLM step
at the quickstart's shapes). With one arena, no mmap'd chunks and no trimming, freed blocks
stay in the process and the next step reuses them: the quickstart end to end 290 -> 240 s,
BERT-base fp32 16 x 128 6.32 -> 5.92 s per step (docs/performance.md).

The price is a heap that does not shrink and fragments: a large step can hold about twice its
memory (GPT-2 124M bf16: peak RSS 5.3 -> 10.5 GB). So a watcher thread reads the process's
resident size, and once it passes half the host's RAM (or the host's available memory falls
under a tenth) it gives glibc back its mmap and trim behaviour and trims the heap (again each
half second while memory stays short, as the blocks held until then are freed): the run goes on
with the default malloc's speed and memory from there, and says so on stderr.

`TENURE_HOST_MALLOC=default` keeps glibc's own behaviour from the start. Applied only where the
train step runs on the host CPU (no GPU / TPU device nodes, or JAX_PLATFORMS=cpu), only with
glibc, and at `tenure` start-up, before JAX starts its threads (a thread keeps the arena it first
used; the arena count is the one option that cannot change later).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import time

from tenure.models.errors import TenureError

# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
MODES = ("reuse", "default")
RSS_SHARE = 0.5  # of MemTotal: past it, freed memory goes back to the system
AVAILABLE_FLOOR_SHARE = 0.1  # of MemTotal: under it (other processes), the same
WATCH_INTERVAL_S = 0.5

MODE = "default"  # "reuse", "released" (the watcher gave memory back) or "default"; bench records it


def _host_runs_the_step() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def _meminfo_bytes() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        fields = (line.split() for line in f)
        return {parts[0].rstrip(":"): int(parts[1]) * 1024 for parts in fields if len(parts) >= 2}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def keep_freed_memory(rss_limit_bytes: int | None = None) -> str:
    """Set the malloc options above and start the watcher; returns MODE. rss_limit_bytes
    overrides half the host's RAM as the point where memory is given back."""
    global MODE
    requested = os.environ.get("TENURE_HOST_MALLOC", "reuse")
    if requested not in MODES:
        raise TenureError(f"TENURE_HOST_MALLOC={requested!r}: expected one of {', '.join(MODES)}")
    if requested != "reuse" or not sys.platform.startswith("linux") or not _host_runs_the_step():
        return MODE
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # only glibc has these options
    except (OSError, AttributeError):
        return MODE
    total = _meminfo_bytes()["MemTotal"]
    limit = rss_limit_bytes if rss_limit_bytes is not None else int(RSS_SHARE * total)
    options = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    if all(libc.mallopt(option, value) == 1 for option, value in options):
        MODE = "reuse"
        threading.Thread(target=_watch, args=(libc, limit, int(AVAILABLE_FLOOR_SHARE * total)),
                         name="tenure-host-memory", daemon=True).start()
    return MODE


def _watch(libc, rss_limit: int, available_floor: int) -> None:
    """Blocks malloc'd before the release stay in the heap when freed (no mmap, no trim then):
    while memory stays short, trim again so each one goes back as soon as it is freed."""
    while True:
        time.sleep(WATCH_INTERVAL_S)
        rss, available = resident_bytes(), _meminfo_bytes().get("MemAvailable", available_floor + 1)
        if rss > rss_limit or available < available_floor:
            if MODE == "reuse":
                _give_memory_back(libc, rss, available)
            libc.malloc_trim(0)


def _give_memory_back(libc, rss: int, available: int) -> None:
    """glibc's steady state under its dynamic threshold: blocks of 32 MB and more are mmap'd,
    the heap top is trimmed past 64 MB."""
    global MODE
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    libc.mallopt(M_MMAP_MAX, 65536)
    MODE = "released"
    print(f"tenure: process memory {rss / 2**30:.1f} GiB, host available {available / 2**30:.1f} GiB: "
          "freed step buffers go back to the system from now on (steps may slow; "
          "TENURE_HOST_MALLOC=default starts a run this way)", file=sys.stderr, flush=True)
