"""A process that runs a study's `tenure` commands one after another, keeping compiled steps.

Each run is a separate process under `--process-per-run`; by default the study hands its runs to
workers (one per job), so that runs whose train or eval programs are equal (the seeds of one
method, every run's evaluation) reuse the executables the worker compiled for an earlier run
(engine/runtime/executables.py). A run in a worker is the same `tenure` command: its output goes
to its own study.log (file descriptors 1 and 2 point there while it runs), its exit code is what
the command would exit with, and signals reach it as they would reach `tenure train`.

Protocol: one JSON request per line on stdin, {"argv": [...], "log": path} (optionally "err":
a second path that takes stderr apart from stdout); one reply per line on the stdout the worker
started with, {"code": int}. A run that does not exit 0 ends the
worker after its reply, so the next run starts in a fresh process.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import sys
import traceback


@contextlib.contextmanager
def _output_to(path: str, err_path: str | None = None):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log, open(err_path or path, "a") as err:
        os.dup2(log.fileno(), 1)
        os.dup2(err.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _run(argv: list[str]) -> int:
    from tenure.engine import cli
    from tenure.engine.runtime import executables
    before = dict(executables.STATS)
    try:
        code = cli.main(argv)
    except SystemExit as exc:   # argparse errors exit 2, as the command would
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:       # noqa: BLE001  (reported in the run's log; the worker then ends)
        traceback.print_exc()
        code = 1
    if "jax" in sys.modules:
        import jax
        for array in jax.live_arrays():  # nothing in flight when the next run (or exit) frees executables
            array.block_until_ready()
    gc.collect()
    compiled, reused = (executables.STATS[k] - before[k] for k in ("compiled", "reused"))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: kB
    print(f"study worker {os.getpid()}: peak resident {peak_gb:.1f} GB; steps compiled {compiled}, reused from "
          f"earlier runs of this process {reused}", flush=True)
    return code


def serve() -> None:
    from tenure.engine.runtime.host_memory import keep_freed_memory
    keep_freed_memory()   # as `tenure` does, before JAX starts its threads
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)         # stray prints between runs must not corrupt the replies
    code = 0
    for line in sys.stdin:
        request = json.loads(line)
        with _output_to(request["log"], request.get("err")):
            code = _run(request["argv"])
        replies.write(json.dumps({"code": code}) + "\n")
        replies.flush()
        if code != 0:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)   # skip the interpreter's teardown, as `tenure` does (cli.entry)


if __name__ == "__main__":
    serve()
