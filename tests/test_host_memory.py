"""engine.host_memory (TENURE_HOST_MALLOC=reuse): the process keeps freed blocks for the next
step instead of faulting fresh pages in every step. Each case runs in a new process (malloc options must be
set before JAX starts its threads)."""
import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
from engine.host_memory import keep_freed_memory
tuned = keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((25_000_000,))                    # 100 MB
f = jax.jit(lambda x: x * 2 + 1)               # a fresh 100 MB output every call
for _ in range(10):                            # warm-up: the heap grows to its working size
    f(x).block_until_ready()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = f(x); y.block_until_ready(); del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults)[len(faults) // 2]     # the median call: an occasional heap growth aside
print(json.dumps({"tuned": tuned, "faults_per_call": faults}))
"""


def probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")
def test_freed_step_buffers_are_reused_instead_of_faulted_in_again():
    default, tuned = probe(), probe(TENURE_HOST_MALLOC="reuse")
    assert default["tuned"] is False and tuned["tuned"] is True
    pages = 100e6 / 4096
    assert default["faults_per_call"] > 0.8 * pages  # every page of the output faulted in again
    assert tuned["faults_per_call"] < 0.05 * pages  # once warm, the freed blocks are reused


def test_left_alone_when_the_step_runs_on_an_accelerator():
    code = "from engine.host_memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "tpu", "TENURE_HOST_MALLOC": "reuse"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"
