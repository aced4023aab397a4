"""Run a study's runs as subprocesses, N at once, skipping the finished ones.

A run is finished when its ``forgetting.json`` exists (the engine writes it last), so a
killed study resumes where it stopped; an unfinished run dir is simply run again (the
engine itself resumes from its newest checkpoint). Each run dir gets ``study_run.json``
(the command) before it starts, and its output goes to ``study.log``. A finished run whose
recorded command differs from the study's current one is an error, not a silent reuse.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TextIO

from tenure.engine.runtime import atomic
from tenure.engine.study.config import Run
from tenure.models.errors import TenureError

RECORD, LOG = "study_run.json", "study.log"


def thread_env(jobs: int, cores: int | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment for each run when `jobs` share `cores`: every thread pool capped at cores // jobs.

    With one job the environment is left as it is (the run may use every core).
    """
    env = dict(os.environ if base is None else base)
    if jobs <= 1:
        return env
    cores = cores or len(os.sched_getaffinity(0))
    threads = str(max(1, cores // jobs))
    xla = env.get("XLA_FLAGS", "").split()
    xla = [f for f in xla if not f.startswith(("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads"))]
    env["XLA_FLAGS"] = " ".join([*xla, "--xla_cpu_multi_thread_eigen=false",
                                 f"intra_op_parallelism_threads={threads}"])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env[name] = threads
    env["TF_NUM_INTEROP_THREADS"] = "1"
    return env


def _recorded(run: Run) -> dict:
    return {"method": run.method, "cell": dict(run.cell.values), "seed": run.seed, "command": list(run.command[1:])}


def is_finished(run: Run) -> bool:
    return run.result.is_file()


def check_resumable(runs: list[Run]) -> None:
    """Refuse to reuse a run dir made by a different command (the study file changed)."""
    for run in runs:
        path = run.run_dir / RECORD
        if not path.is_file():
            continue
        record = atomic.read_json(path, f"remove {run.run_dir} (its run starts over) or choose another --out")
        old = record.get("command") if isinstance(record, dict) else None
        if old != list(run.command[1:]):
            raise TenureError(f"{run.run_dir}: made by another command ({path}); the study's overrides changed. "
                              "Remove that run dir or choose another --out")


@dataclasses.dataclass
class Outcome:
    skipped: list[Run] = dataclasses.field(default_factory=list)
    done: list[Run] = dataclasses.field(default_factory=list)
    failed: list[tuple[Run, str]] = dataclasses.field(default_factory=list)  # (run, reason with log path)


class _Runner:
    def __init__(self, total: int, finished: int, env: dict, stream: TextIO):
        self.total, self.finished, self.env, self.stream = total, finished, env, stream
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def say(self, text: str) -> None:
        with self.lock:
            print(text, file=self.stream, flush=True)

    def __call__(self, run: Run) -> str | None:
        """Runs one; returns None on success, else the reason (naming the log)."""
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run.run_dir / RECORD, json.dumps(_recorded(run), indent=1) + "\n")
        log_path = run.run_dir / LOG
        start = time.monotonic()
        with open(log_path, "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(run.command)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return "not started (study interrupted)"
                proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        stdin=subprocess.DEVNULL)
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        elapsed = time.monotonic() - start
        if code == 0 and is_finished(run):
            reason = None
        elif code == 0:
            reason = f"exited 0 but wrote no {run.result.name}; log: {log_path}"
        else:
            reason = f"exit code {code}; log: {log_path}"
        with self.lock:
            if reason is not None and self.stopping:
                reason = f"stopped with the study; log: {log_path}"
            self.finished += 1
            status = "ok" if reason is None else "FAILED"
            print(f"[{self.finished}/{self.total}] {run.name}: {status} in {_duration(elapsed)}, "
                  f"{self.total - self.finished} left" + ("" if reason is None else f" ({reason})"),
                  file=self.stream, flush=True)
        return reason

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                proc.terminate()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the study: `tenure study` exits 143 (128 + SIGTERM), as `tenure train` does."""
    exit_code = 128 + signal.SIGTERM


def _raise_on_sigterm():
    """SIGTERM to the study stops its runs too (as Ctrl-C does); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def run_all(runs: list[Run], *, jobs: int = 1, env: dict | None = None, stream: TextIO | None = None) -> Outcome:
    """Run every unfinished run, `jobs` at once; failures are reported and the rest go on."""
    stream = stream or sys.stdout
    if jobs < 1:
        raise TenureError(f"--jobs: must be at least 1, got {jobs}")
    check_resumable(runs)
    outcome = Outcome()
    todo = []
    for run in runs:
        (outcome.skipped if is_finished(run) else todo).append(run)
    print(f"{len(runs)} run{'s' * (len(runs) != 1)}: {len(outcome.skipped)} already done, {len(todo)} to run"
          + (f", {min(jobs, len(todo))} at a time" if len(todo) > 1 and jobs > 1 else ""), file=stream, flush=True)
    if not todo:
        return outcome
    runner = _Runner(len(runs), len(outcome.skipped), thread_env(jobs) if env is None else env, stream)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    previous = _raise_on_sigterm()
    try:
        futures = {pool.submit(runner, run): run for run in todo}
        for future in concurrent.futures.as_completed(futures):
            run, reason = futures[future], future.result()
            if reason is None:
                outcome.done.append(run)
            else:
                outcome.failed.append((run, reason))
    except BaseException:
        runner.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    order = {id(r): i for i, r in enumerate(runs)}
    outcome.done.sort(key=lambda r: order[id(r)])
    outcome.failed.sort(key=lambda f: order[id(f[0])])
    return outcome
