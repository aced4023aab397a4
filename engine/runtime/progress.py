"""Progress of a long loop: step, loss, tokens/s (moving window) and ETA.

On a terminal this is a tqdm bar; when stderr is not a TTY (CI, log files) it prints one
plain line every `log_every` steps instead, so logs stay readable. Non-primary processes
print nothing.
"""
import collections
import sys
import time
from typing import Callable, TextIO

import jax
from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total_steps: int,
        desc: str = "train",
        enabled: bool | None = None,
        *,
        initial: int = 0,
        window: int = 20,
        log_every: int = 50,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ):
        self.total_steps = total_steps
        self.desc = desc
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.log_every = log_every
        self._clock = clock
        self._stream = stream or sys.stderr
        # (time, step, tokens of that step); the oldest entry only marks the window start.
        self._window = collections.deque([(clock(), initial, 0)], maxlen=window + 1)
        self.step = initial
        self.loss: float | None = None
        self._bar = None
        if self.enabled and self._stream.isatty():
            self._bar = tqdm(
                total=total_steps, initial=initial, desc=desc, file=self._stream,
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )

    def update(self, step: int, loss: float | None, tokens: int) -> None:
        """Records that `step` finished after `tokens` tokens; loss None keeps the last one.

        Passing None on most steps avoids a device sync for `float(loss)` every step.
        """
        self._window.append((self._clock(), step, tokens))
        self.step = step
        if loss is not None:
            self.loss = float(loss)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(self.postfix(), refresh=True)
        elif self.enabled and (step % self.log_every == 0 or step == self.total_steps):
            print(self.line(), file=self._stream, flush=True)

    def _elapsed(self) -> float:
        return self._window[-1][0] - self._window[0][0]

    @property
    def tokens_per_second(self) -> float:
        elapsed = self._elapsed()
        tokens = sum(entry[2] for entry in list(self._window)[1:])
        return tokens / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        elapsed = self._elapsed()
        steps = self._window[-1][1] - self._window[0][1]
        if elapsed <= 0 or steps <= 0:
            return None
        return (self.total_steps - self.step) * elapsed / steps

    def postfix(self) -> str:
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        eta = self.eta_seconds
        eta_text = "?" if eta is None else tqdm.format_interval(eta)
        return f"loss={loss} tok/s={tqdm.format_sizeof(self.tokens_per_second)} eta={eta_text}"

    def line(self) -> str:
        return f"{self.desc} step {self.step}/{self.total_steps} {self.postfix()}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
