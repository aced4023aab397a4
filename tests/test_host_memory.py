"""tenure.engine.runtime.host_memory: on CPU hosts the process keeps freed step buffers for the next step
instead of faulting fresh pages in every step, and gives memory back once it grows past its
bound. Each case runs in a new process (malloc options must be set before JAX starts its
threads)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
PAGES_PER_CALL = 100e6 / 4096  # the probe's 100 MB output

PROBE = """
import json, os, resource, sys, time
from tenure.engine.runtime import host_memory
limit = os.environ.get("PROBE_RSS_LIMIT")
if limit:  # the RSS bound under test, not low MemAvailable while a parallel test holds 9 GB
    host_memory.AVAILABLE_FLOOR_SHARE = 0.0
mode = host_memory.keep_freed_memory(int(limit) if limit else None)
import jax, jax.numpy as jnp
x = jnp.ones((25_000_000,))                    # 100 MB
f = jax.jit(lambda x: x * 2 + 1)               # a fresh 100 MB output every call

def faults_per_call():
    for _ in range(10):                        # warm-up: the heap grows to its working size
        f(x).block_until_ready()
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x); y.block_until_ready(); del y
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults)[len(faults) // 2]    # the median call: an occasional heap growth aside

record = {"mode": mode, "faults_per_call": faults_per_call()}
if limit:
    big = jnp.ones((500_000_000,)).block_until_ready()   # 2 GB held: past the limit
    time.sleep(4 * host_memory.WATCH_INTERVAL_S)
    record["rss_holding_gb"] = host_memory.resident_bytes() / 1e9
    del big
    time.sleep(2 * host_memory.WATCH_INTERVAL_S)
    record |= {"mode_after": host_memory.MODE, "rss_after_gb": host_memory.resident_bytes() / 1e9}
    # Larger than any free chunk the heap kept: glibc maps it apart again and unmaps it on free,
    # with no trim in between (read at once, before the watcher's next turn).
    bigger = jnp.ones((750_000_000,)).block_until_ready()   # 3 GB
    record["rss_holding_bigger_gb"] = host_memory.resident_bytes() / 1e9
    bigger.delete()
    record["rss_freed_bigger_gb"] = host_memory.resident_bytes() / 1e9
print(json.dumps(record))
"""


def probe(**env) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")


@linux_only
def test_freed_step_buffers_are_reused_instead_of_faulted_in_again():
    (default, _), (tuned, _) = probe(TENURE_HOST_MALLOC="default"), probe()
    assert default["mode"] == "default" and tuned["mode"] == "reuse"
    assert default["faults_per_call"] > 0.8 * PAGES_PER_CALL  # every page of the output faulted in again
    assert tuned["faults_per_call"] < 0.05 * PAGES_PER_CALL  # once warm, the freed blocks are reused


@linux_only
def test_memory_goes_back_to_the_system_past_the_bound():
    # The probe's own warm-up peaks at 1.1-1.4 GB (a bound of 1.5 GB was crossed once under load,
    # releasing before the fault count); the 2 GB block held below takes it well past 2.2 GB.
    record, stderr = probe(PROBE_RSS_LIMIT=str(2_200_000_000))
    assert record["mode"] == "reuse" and record["faults_per_call"] < 0.05 * PAGES_PER_CALL
    assert record["rss_holding_gb"] > 2.0
    assert record["mode_after"] == "released"
    assert "freed step buffers go back to the system" in stderr
    assert record["rss_after_gb"] < record["rss_holding_gb"] - 1.5  # the 2 GB block was trimmed
    # glibc's own behaviour again: a large block goes back the moment it is freed
    assert record["rss_holding_bigger_gb"] > record["rss_after_gb"] + 2.9
    assert record["rss_freed_bigger_gb"] < record["rss_holding_bigger_gb"] - 2.9


def test_left_alone_when_the_step_runs_on_an_accelerator():
    code = "from tenure.engine.runtime.host_memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "tpu"}, cwd=ROOT)
    assert out.stdout.strip() == "default"


def test_an_unknown_setting_is_one_clear_error():
    out = subprocess.run([sys.executable, "-m", "tenure.engine.cli", "--help"], capture_output=True, text=True,
                         env={**os.environ, "TENURE_HOST_MALLOC": "resue"}, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: TENURE_HOST_MALLOC='resue': expected one of reuse, default"
