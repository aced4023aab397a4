"""Running the `tenure` CLI (in a study worker or its own process), a reduced study, or a two-process
JAX job, from a test."""
import atexit
import json
import os
import pathlib
import select
import socket
import subprocess
import sys
import tempfile
import threading

import yaml

from tenure.engine.study.runner import WorkerPool

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
    """`tenure ARGS` from the repository root (environment: `cli_env`); asserts exit 0 when `check`.

    A run expected to succeed (`check`, tiny models) goes to a study worker
    (engine/study/worker.py), as `tenure study` hands its runs: the same `tenure` command in a
    process that has imported the engine and keeps the steps earlier runs compiled, which saves
    about half of a tiny run's 12-14 s. A run expected to fail, and a real model's, is a fresh
    `python -m tenure.engine.cli` process, so exit codes and messages are tested where users meet
    them."""
    if check and not real_model:
        result = _WORKERS.run([str(a) for a in args], cli_env(), timeout)
    else:
        result = subprocess.run([sys.executable, "-m", "tenure.engine.cli", *map(str, args)], cwd=ROOT,
                                env=cli_env(real_model), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (result.stderr or result.stdout)[-3000:]
    return result


class _Workers:
    """The idle study workers of this test process, a `WorkerPool` (the engine's) per environment.
    A run that does not exit 0 ends its worker (the worker's rule), so the next run gets a fresh one."""

    def __init__(self):
        self.pools: dict[tuple, WorkerPool] = {}
        self.lock = threading.Lock()
        atexit.register(self.close)

    def run(self, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        # pytest names the running test in the environment; tenure never reads it, and a key that
        # held it would start a worker for every test
        key = tuple(sorted((k, v) for k, v in env.items() if k != "PYTEST_CURRENT_TEST"))
        with self.lock:
            pool = self.pools.setdefault(key, WorkerPool(keep=2))   # each holds its compiled steps
        worker = pool.take() or subprocess.Popen([sys.executable, "-m", "tenure.engine.study.worker"], cwd=ROOT,
                                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with tempfile.TemporaryDirectory() as out:
            log, err = pathlib.Path(out) / "stdout", pathlib.Path(out) / "stderr"
            worker.stdin.write(json.dumps({"argv": argv, "log": str(log), "err": str(err)}) + "\n")
            worker.stdin.flush()
            if not select.select([worker.stdout], [], [], timeout)[0]:
                worker.kill()
                raise subprocess.TimeoutExpired(argv, timeout)
            reply = worker.stdout.readline()
            code = json.loads(reply)["code"] if reply else worker.wait()
            stdout = log.read_text() if log.exists() else ""
            stderr = err.read_text() if err.exists() else ""
        # the worker's own line after each run (its memory and compiled steps) is not the command's
        stdout = "".join(line for line in stdout.splitlines(keepends=True) if not line.startswith("study worker "))
        if code != 0:
            worker.wait()
        else:
            pool.give(worker)
        return subprocess.CompletedProcess(["tenure", *argv], code, stdout, stderr)

    def close(self) -> None:
        with self.lock:
            pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            pool.close()


_WORKERS = _Workers()


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
