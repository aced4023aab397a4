"""SIGTERM / SIGINT as a request to stop cleanly (preemption on TPU VMs, SLURM, Ctrl-C).

    with StopSignals() as stop:
        for step in ...:
            state = train_step(state, batch)
            if stop.requested:          # a plain attribute read: no syscall, no device sync
                save(step, state); wait for the save
                print(stop.stopped_message(step, checkpoint_dir))
                return stop.exit_code   # 143 for SIGTERM, 130 for SIGINT

The first signal only sets `requested` (and says so on stderr); the loop finishes the step
it is in, saves, and exits. A second signal exits at once with the conventional code
128 + signum: checkpoint steps are written into temporary directories and renamed when
complete, so an interrupted save is never mistaken for a checkpoint (the next run drops it).

Multi-host: every process must stop at the same step. Poll `stop.requested_anywhere()`
(one small all-gather) at the loop's sync points, e.g. when it saves or evaluates.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager; outside the main thread it installs nothing and never requests."""

    def __init__(self, signals: tuple[int, ...] = HANDLED, stream=None):
        self.signals = signals
        self.stream = stream
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        """128 + signum (143 for SIGTERM, 130 for SIGINT); 0 when no signal came."""
        return 128 + self.signum if self.signum else 0

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self._say(f"{signal.Signals(signum).name} again: exiting now without saving; the "
                      "newest complete checkpoint is kept")
            os._exit(128 + signum)
        self.requested, self.signum = True, signum
        self._say(f"{signal.Signals(signum).name} received: finishing this step, saving a "
                  "checkpoint, then stopping (send it again to exit at once)")

    def requested_anywhere(self) -> bool:
        """True when any process got a signal (collective: every process must call it)."""
        import jax
        if jax.process_count() == 1:
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

    def stopped_message(self, step: int, where: str) -> str:
        return (f"stopped by {self.name or 'request'} after step {step}; checkpoint saved in {where}; "
                "run the same command again to resume")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
