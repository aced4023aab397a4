"""SIGTERM / SIGINT: the first is a flag the loop polls, a second exits at once. Real
subprocesses, real signals."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tenure.engine.runtime.signals import StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = textwrap.dedent("""
    import sys, time
    from tenure.engine.runtime.signals import StopSignals
    obey = sys.argv[1] == "obey"
    with StopSignals() as stop:
        print("ready", flush=True)
        for step in range(1, 10_000):
            time.sleep(0.02)                      # one training step
            if obey and stop.requested:
                print(f"saved step {step}", flush=True)
                print(stop.stopped_message(step, "ck"), flush=True)
                sys.exit(stop.exit_code)
    print("never stopped", flush=True)
""")


def start(mode):
    proc = subprocess.Popen([sys.executable, "-c", LOOP, mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_first_signal_finishes_the_step_and_exits_cleanly(sig, code):
    proc = start("obey")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    name = signal.Signals(sig).name
    assert proc.returncode == code
    assert out.splitlines()[0].startswith("saved step ")
    step = out.splitlines()[0].split()[-1]
    assert out.splitlines()[1] == (f"stopped by {name} after step {step}; checkpoint saved in ck; "
                                   "run the same command again to resume")
    assert err.strip() == (f"{name} received: finishing this step, saving a checkpoint, then stopping "
                           "(send it again to exit at once)")
    assert "Traceback" not in err


def test_second_signal_exits_at_once():
    proc = start("ignore")  # a loop stuck in a long step never polls the flag
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None  # the first one only asked
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "never stopped" not in out
    assert err.strip().splitlines()[-1] == (
        "SIGTERM again: exiting now without saving; the newest complete checkpoint is kept")


def test_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert (stop.requested, stop.exit_code) == (False, 0)
    assert signal.getsignal(signal.SIGTERM) == before
