"""Running the `tenure` CLI, a reduced study, or a two-process JAX job, as subprocesses of a test."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli_env(real_model: bool = False) -> dict[str, str]:
    """The environment of a `tenure` subprocess: the machine's real devices (the test session's 8
    simulated CPU devices are not passed on); with `real_model` (MiniLM-size runs), XLA's default
    optimisation level too: conftest's level 0 compiles tiny models 3x faster, but runs a real
    model's steps so much slower (a 10 + 10-step MiniLM continual run: 96 s against 60 s) that
    it loses. Tiny-model runs also compile XLA's default dots instead of oneDNN's (the path
    AVX2 hosts take): oneDNN executables cannot enter the persistent compilation cache, and the
    suite's tiny runs compile the same steps again and again (a 6 + 6-step staged run: 25.7 s with
    oneDNN, 16.2 s from the cache). Real-model runs keep the dots their figures were measured with."""
    drop = {"JAX_NUM_CPU_DEVICES", "XLA_FLAGS"} if real_model else {"JAX_NUM_CPU_DEVICES"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if not real_model:
        env.setdefault("TENURE_XLA_ONEDNN", "0")
    return env


def tenure(*args, check=True, timeout=600, real_model=False) -> subprocess.CompletedProcess:
    """`python -m tenure.engine.cli ARGS` from the repository root (environment: `cli_env`); asserts
    exit 0 when `check`."""
    env = cli_env(real_model)
    result = subprocess.run([sys.executable, "-m", "tenure.engine.cli", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def study_records(tmp_path, spec: dict) -> dict[str, dict]:
    """Runs the study `spec` (a study file's mapping, seed 0) with `tenure study --jobs 1`: one
    worker process trains the shared first stage, then every branch, reusing the compiled steps
    they share. Returns each run's forgetting.json by its directory relative to the study's cell ('naive/seed0',
    'batched/ewc.lambda-1e7/seed0', ...)."""
    study = tmp_path / "reduced.study.yaml"
    study.write_text(yaml.safe_dump({"seeds": 1, **spec}))
    tenure("study", study, "--jobs", "1", "--out", tmp_path / "out", timeout=1800, real_model=True)
    cell = tmp_path / "out" / "base"
    return {str(path.parent.relative_to(cell)): json.loads(path.read_text())
            for path in cell.glob("*/**/forgetting.json") if path.parts[len(cell.parts)] != "first_stage"}


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
