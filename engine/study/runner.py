"""Run a study's runs, N at once, skipping the finished ones.

With a `WorkerPool`, each job hands its `tenure` commands to one worker process
(engine/study/worker.py) that runs them one after another and keeps their compiled steps, so a
seed or method whose programs equal an earlier run's does not compile again; without one
(`tenure study --process-per-run`) every run is a fresh process.

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
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, TextIO

from tenure.engine.continual.branch import source_checkpoints
from tenure.engine.runtime import atomic
from tenure.engine.config.plan import plan
from tenure.engine.study.config import Run, run_config
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
    """Refuse to reuse a run dir made by a different command (the study file changed). Where its
    first stage came from does not count: which shared first-stage run a run branches from depends
    on the methods of the invocation (`--methods`), and a branch computes that stage bit for bit."""
    def own(command) -> list | None:
        return [part for part in command if not str(part).startswith("branch_from=")] \
            if isinstance(command, list) else None

    for run in runs:
        path = run.run_dir / RECORD
        if not path.is_file():
            continue
        record = atomic.read_json(path, f"remove {run.run_dir} (its run starts over) or choose another --out")
        old = record.get("command") if isinstance(record, dict) else None
        if own(old) != own(list(run.command[1:])):
            raise TenureError(f"{run.run_dir}: made by another command ({path}); the study's overrides changed. "
                              "Remove that run dir or choose another --out")


@dataclasses.dataclass
class Outcome:
    skipped: list[Run] = dataclasses.field(default_factory=list)
    done: list[Run] = dataclasses.field(default_factory=list)
    failed: list[tuple[Run, str]] = dataclasses.field(default_factory=list)  # (run, reason with log path)


_CLI = (sys.executable, "-m", "tenure.engine.cli")
_WORKER = (sys.executable, "-m", "tenure.engine.study.worker")


class WorkerPool:
    """Idle study workers, kept across the `run_all` calls of one study (its first stages, the
    trained runs, the interpolations) so later runs reuse what earlier ones compiled. `keep`: at
    most that many idle (each holds its compiled steps); a worker given beyond it is ended."""

    def __init__(self, keep: int | None = None):
        self.idle: list[subprocess.Popen] = []
        self.keep = keep
        self.lock = threading.Lock()

    def take(self) -> subprocess.Popen | None:
        with self.lock:
            while self.idle:
                worker = self.idle.pop()
                if worker.poll() is None:
                    return worker
            return None

    def give(self, worker: subprocess.Popen) -> None:
        with self.lock:
            kept = self.keep is None or len(self.idle) < self.keep
            if kept:
                self.idle.append(worker)
        if not kept:
            worker.stdin.close()
            worker.wait()

    def close(self) -> None:
        """End the idle workers (stdin closed: each exits)."""
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.stdin.close()
            worker.wait()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _executed(command: tuple[str, ...], unsaved: bool) -> list[str]:
    """The command as run. A `train` run that starts over (its checkpoints pruned, or none yet) may
    replace its own unfinished run's files (`--overwrite`), as an interpolation may (`--force`):
    the study owns its run dirs, and a run without forgetting.json is unfinished. An `unsaved`
    one writes no checkpoints. None of it is recorded in study_run.json: the run computes the same."""
    if tuple(command[len(_CLI):len(_CLI) + 1]) == ("interpolate",):
        return [*command, "--force"]  # --as-run into its own unfinished run dir
    if not _trains(command):
        return list(command)
    return [*command, *(["checkpoint.enabled=false"] if unsaved else []), "--overwrite"]


def _trains(command: tuple[str, ...]) -> bool:
    return tuple(command[len(_CLI):len(_CLI) + 1]) == ("train",)


class _Runner:
    def __init__(self, total: int, finished: int, env: dict, stream: TextIO, pool: "WorkerPool | None",
                 prune: Callable[[Run], bool]):
        self.total, self.finished, self.env, self.stream, self.pool = total, finished, env, stream, pool
        self.prune = prune
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()   # the processes running a run now
        self.stopping = False

    def say(self, text: str) -> None:
        with self.lock:
            print(text, file=self.stream, flush=True)

    def __call__(self, run: Run) -> str | None:
        """Runs one; returns None on success, else the reason (naming the log)."""
        if self.stopping:   # the study was stopped before this run began: it leaves no trace
            return "not started (study interrupted)"
        # a run whose checkpoints are deleted once it finishes writes none, unless it ends on its best
        unsaved = self.prune(run) and _trains(run.command) and not plan(run_config(run)).ends_on_best
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run.run_dir / RECORD, json.dumps(_recorded(run), indent=1) + "\n")
        log_path = run.run_dir / LOG
        start = time.monotonic()
        command = _executed(run.command, unsaved)
        with open(log_path, "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
        if self.pool is None or run.command[:len(_CLI)] != _CLI:
            code = self._in_own_process(command, log_path)
        else:
            code = self._in_worker(command, log_path)
        if code is None:
            return "not started (study interrupted)"
        elapsed = time.monotonic() - start
        if code == 0 and is_finished(run):
            reason = None
            if self.prune(run):  # a finished run is never resumed: its weights only take disk
                if not unsaved:
                    shutil.rmtree(source_checkpoints(run.run_dir)[0], ignore_errors=True)
                shutil.rmtree(pathlib.Path(run.run_dir) / "hf", ignore_errors=True)
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

    def _start(self, command, **popen) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(command, env=self.env, **popen)
            self.procs.add(proc)
            return proc

    def _done(self, proc: subprocess.Popen) -> int:
        code = proc.wait()
        with self.lock:
            self.procs.discard(proc)
        return code

    def _in_own_process(self, command: list[str], log_path) -> int | None:
        with open(log_path, "a") as log:
            proc = self._start(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            return None if proc is None else self._done(proc)

    def _in_worker(self, command: list[str], log_path) -> int | None:
        worker = self.pool.take()
        if worker is not None:
            with self.lock:
                if self.stopping:
                    self.pool.give(worker)
                    return None
                self.procs.add(worker)
        else:
            worker = self._start(_WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if worker is None:
                return None
        request = {"argv": command[len(_CLI):], "log": str(log_path)}
        try:
            worker.stdin.write(json.dumps(request) + "\n")
            worker.stdin.flush()
            reply = worker.stdout.readline()
        except (BrokenPipeError, ValueError):   # the worker died, or its pipe was closed
            reply = ""
        code = json.loads(reply)["code"] if reply else None
        if code == 0:
            with self.lock:
                self.procs.discard(worker)
            self.pool.give(worker)
            return 0
        ended = self._done(worker)   # a failed run ends its worker; the next run gets a fresh one
        return ended if code is None else code

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


def _stop_on_signals(runner: "_Runner") -> tuple[dict, list[int]]:
    """SIGTERM or SIGINT to the study stops its runs. The handler only records the signal and
    terminates the running processes; `run_all` raises once every run has returned. An exception
    raised by the handler itself can land in a gc callback or a __del__, where Python swallows it,
    and the study would then wait for its runs to finish. Returns the previous handlers and the
    list the signals are recorded in."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return {}, received

    def handler(signum, frame):
        received.append(signum)
        runner.stop()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}, received


def run_all(runs: list[Run], *, jobs: int = 1, env: dict | None = None, stream: TextIO | None = None,
            pool: WorkerPool | None = None, prune: Callable[[Run], bool] = lambda run: False) -> Outcome:
    """Run every unfinished run, `jobs` at once; failures are reported and the rest go on.
    With a worker `pool` the `tenure` commands run in its workers; without, each in its own process.
    A run for which `prune(run)` is true has its checkpoints deleted once it has finished."""
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
    runner = _Runner(len(runs), len(outcome.skipped), thread_env(jobs) if env is None else env, stream, pool, prune)
    threads = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    previous, received = _stop_on_signals(runner)
    try:
        futures = {threads.submit(runner, run): run for run in todo}
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
        threads.shutdown(wait=True, cancel_futures=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Terminated("SIGTERM") if received[0] == signal.SIGTERM else KeyboardInterrupt
    order = {id(r): i for i, r in enumerate(runs)}
    outcome.done.sort(key=lambda r: order[id(r)])
    outcome.failed.sort(key=lambda f: order[id(f[0])])
    return outcome
