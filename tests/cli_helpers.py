"""Running the `tenure` CLI, or a two-process JAX job, as subprocesses of a test."""
import json
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli_env(real_model: bool = False) -> dict[str, str]:
    """The environment of a `tenure` subprocess: the machine's real devices (the test session's 8
    simulated CPU devices are not passed on); with `real_model` (MiniLM-size runs), XLA's default
    optimisation level too: conftest's level 0 compiles tiny models 3x faster, but runs a real
    model's steps so much slower (a 10 + 10-step MiniLM continual run: 96 s against 60 s) that
    it loses."""
    drop = {"JAX_NUM_CPU_DEVICES", "XLA_FLAGS"} if real_model else {"JAX_NUM_CPU_DEVICES"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def tenure(*args, check=True, timeout=600, real_model=False) -> subprocess.CompletedProcess:
    """`python -m tenure.engine.cli ARGS` from the repository root (environment: `cli_env`); asserts
    exit 0 when `check`."""
    env = cli_env(real_model)
    result = subprocess.run([sys.executable, "-m", "tenure.engine.cli", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_two_processes(worker: str, *args, timeout=300) -> list[dict]:
    """Runs `python -c worker PORT INDEX *args` as processes 0 and 1 of one JAX job on a free
    localhost port (CPU, the real device count); asserts both exit 0 and returns each one's
    `RESULT {json}` line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-c", worker, str(port), str(i), *map(str, args)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results
