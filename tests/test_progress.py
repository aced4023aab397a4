"""Progress bar: tokens/s over a moving window, ETA, plain-log fallback, silence when disabled."""
import io

from tenure.engine.runtime.progress import Progress


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tokens_per_second_over_moving_window_and_eta():
    clock = FakeClock(100.0)
    progress = Progress(100, "train", enabled=True, window=2, clock=clock, stream=io.StringIO())
    assert progress.postfix() == "loss=n/a tok/s=0.00 eta=?"
    clock.now = 101.0
    progress.update(1, 2.0, 1000)
    assert (progress.tokens_per_second, progress.eta_seconds) == (1000.0, 99.0)
    assert progress.postfix() == "loss=2.0000 tok/s=1.00k eta=01:39"
    clock.now = 102.0
    progress.update(2, None, 3000)  # None keeps the last loss (no device sync)
    assert (progress.tokens_per_second, progress.eta_seconds) == (2000.0, 98.0)
    assert progress.postfix() == "loss=2.0000 tok/s=2.00k eta=01:38"
    clock.now = 104.0
    progress.update(3, 1.5, 600)  # the window (2 steps) has dropped the start mark at t=100
    assert (progress.tokens_per_second, progress.eta_seconds) == (1200.0, 145.5)
    assert progress.postfix() == "loss=1.5000 tok/s=1.20k eta=02:25"
    assert progress.line() == "train step 3/100 loss=1.5000 tok/s=1.20k eta=02:25"


def test_plain_log_lines_when_not_a_tty():
    clock = FakeClock(0.0)
    stream = io.StringIO()
    progress = Progress(5, "stage-a", enabled=True, log_every=2, clock=clock, stream=stream)
    for step in range(1, 6):
        clock.now = float(step)
        progress.update(step, 1.0 / step, 512)
    progress.close()
    assert stream.getvalue().splitlines() == [
        "stage-a step 2/5 loss=0.5000 tok/s=512 eta=00:03",
        "stage-a step 4/5 loss=0.2500 tok/s=512 eta=00:01",
        "stage-a step 5/5 loss=0.2000 tok/s=512 eta=00:00",
    ]


def test_tqdm_bar_on_a_tty_shows_postfix():
    clock = FakeClock(0.0)
    stream = TTYStream()
    with Progress(4, "train", enabled=True, initial=1, clock=clock, stream=stream) as progress:
        clock.now = 2.0
        progress.update(3, 0.75, 4096)
    output = stream.getvalue()
    assert "train:" in output
    assert "| 3/4 [" in output
    assert "loss=0.7500 tok/s=2.05k eta=00:01" in output


def test_disabled_progress_prints_nothing():
    stream = TTYStream()
    progress = Progress(10, "train", enabled=False, log_every=1, clock=FakeClock(0.0), stream=stream)
    progress.update(1, 1.0, 10)
    progress.close()
    assert stream.getvalue() == ""
