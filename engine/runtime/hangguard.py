"""Hang guard: when a process of a multi-host job dies or stops answering, every other process
exits within a timeout with one line naming it, instead of waiting forever in a collective.

Each process runs a daemon thread that, every `timeout / 6` seconds, bumps its own counter in
the JAX coordination service's key-value store (`tenure/beat/<process>`) and reads every
peer's counter in one call. A peer whose counter has not moved for `timeout` seconds (measured
on this process's own monotonic clock, so host clocks need not agree) is missing; so is the
coordinator itself (process 0, which hosts the store) when the store stops answering for
`timeout` seconds. The thread then prints one line to stderr and ends the process with exit
code 75 (`os._exit`: the main thread may be blocked inside a collective that never returns).

The thread holds the GIL only between beats; JAX releases it while it waits on devices, so the
guard runs while the main thread is stuck in a collective. A process stopped with SIGSTOP or
killed stops beating; one that is merely slow (a long compile) keeps beating from its thread.

When process 0 dies, the store goes with it and JAX's own error polling usually aborts the other
processes at once (its "Terminating process because the JAX distributed service detected fatal
errors" log), before the guard's next beat; the guard's coordinator line covers the cases where
JAX does not notice (a coordinator host that stops answering without resetting connections).

`TENURE_HANG_TIMEOUT` (seconds, default 60; 0 turns the guard off) sets the timeout.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_CODE = 75  # EX_TEMPFAIL: a peer went away; restarting the job (it resumes) is the cure
PREFIX = "tenure/beat/"
DEFAULT_TIMEOUT = 60.0

_guard: "HangGuard | None" = None


def timeout_from_env() -> float:
    raw = os.environ.get("TENURE_HANG_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise SystemExit(f"TENURE_HANG_TIMEOUT={raw!r}: must be a number of seconds (0 = off)") from None


class HangGuard:
    def __init__(self, client, process_index: int, process_count: int, timeout: float, *, exit=os._exit):
        self.client, self.me, self.count, self.timeout = client, process_index, process_count, timeout
        self.interval = max(timeout / 6, 0.05)
        self._exit = exit
        self._stop = threading.Event()
        self._beats = 0
        self._seen: dict[int, tuple[str, float]] = {}  # peer -> (its last counter, when it changed)
        self._store_ok = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="tenure-hang-guard", daemon=True)

    def start(self) -> "HangGuard":
        self.thread.start()
        return self

    def stop(self, done: bool = False) -> None:
        self._stop.set()
        if done:
            try:
                self.client.key_value_set(f"{PREFIX}{self.me}", "done", allow_overwrite=True)
            except Exception:
                pass

    def _missing(self) -> str | None:
        """One line naming the missing process, or None while everyone answers."""
        now = time.monotonic()
        try:
            self._beats += 1
            self.client.key_value_set(f"{PREFIX}{self.me}", str(self._beats), allow_overwrite=True)
            beats = dict(self.client.key_value_dir_get(PREFIX))
            self._store_ok = now
        except Exception as exc:  # the store lives in process 0: it is gone or unreachable
            if now - self._store_ok > self.timeout:
                return (f"hang guard: process 0 of {self.count} (the coordinator) has not answered for "
                        f"{now - self._store_ok:.0f} s ({str(exc).splitlines()[0][:120]}); process {self.me} exits")
            return None
        for peer in range(self.count):
            if peer == self.me:
                continue
            beat = beats.get(f"{PREFIX}{peer}")
            if beat == "done":  # it finished cleanly
                continue
            last = self._seen.get(peer)
            if last is None or last[0] != beat:
                self._seen[peer] = (beat, now)
            elif now - last[1] > self.timeout:
                what = "never answered" if beat is None else "has not answered"
                return (f"hang guard: process {peer} of {self.count} {what} for {now - last[1]:.0f} s "
                        f"(TENURE_HANG_TIMEOUT={self.timeout:g}); process {self.me} exits")
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            line = self._missing()
            if line is not None and not self._stop.is_set():
                print(line, file=sys.stderr, flush=True)
                self._exit(EXIT_CODE)
                return


def start(timeout: float | None = None) -> HangGuard | None:
    """Starts the guard of this process (once), if the job has several processes."""
    global _guard
    import jax
    from jax._src import distributed as jax_distributed

    timeout = timeout_from_env() if timeout is None else timeout
    client = jax_distributed.global_state.client
    if _guard is not None or timeout <= 0 or client is None or jax.process_count() < 2:
        return _guard
    # The guard runs until the interpreter ends: JAX's shutdown at exit waits in a barrier for every
    # process, and a peer that died must not turn that wait into a hang either.
    _guard = HangGuard(client, jax.process_index(), jax.process_count(), timeout).start()
    return _guard


def stop() -> None:
    """Ends this process's guard and tells its peers it left on purpose (they stop watching it)."""
    global _guard
    if _guard is not None:
        _guard.stop(done=True)
        _guard = None
