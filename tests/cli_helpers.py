"""Running the `tenure` CLI as a subprocess of a test, the way a user runs it."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tenure(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    """`python -m engine.cli ARGS` from the repository root on the machine's real devices (the
    test session's 8 simulated CPU devices are not passed on); asserts exit 0 when `check`."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    result = subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
