"""Run safety through the real CLI on the tiny BERT fixture: SIGTERM saves and stops and the rerun
continues the same loss curve; a second run on a busy run dir is refused naming the holder; a
config change that breaks the run is refused on resume (the checkpoints stay); --restart moves
the old run aside."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from test_train_loop import TINY_BERT, data, summary  # noqa: F401  (the `data` fixture)
from tests.cli_helpers import cli_env as env, tenure

ROOT = pathlib.Path(__file__).resolve().parents[1]


def args(run_dir, data, steps, *extra):
    return ["train", "configs/tasks/seq_cls.yaml", f"model.path={TINY_BERT}", f"run_dir={run_dir}",
            f"data.train={data['train']}", f"data.validation={data['validation']}", f"data.test={data['test']}",
            "data.max_length=32", "data.batch_size=8", "data.eval_batch_size=16", f"train.steps={steps}",
            "train.eval_every=1000", "train.log_every=2", "checkpoint.every_steps=1000", "optim.schedule=constant",
            "optim.warmup_ratio=0", "optim.lr=1e-3", "logging.progress=false", *extra]


def start(*argv):
    return subprocess.Popen([sys.executable, "-m", "tenure.engine.cli", *map(str, argv)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_training(proc, run_dir):
    deadline = time.time() + 300
    while not (run_dir / "tb").is_dir() or not any((run_dir / "tb").iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before training started"
        time.sleep(0.05)
    time.sleep(1.0)  # into the step loop


@pytest.mark.slow
def test_sigterm_saves_stops_and_resumes_the_same_curve(data, tmp_path):
    # Evals every 4 steps, no early stopping: validation stalls from step 16 on while the train loss
    # falls, so the overfitting warnings start at step 28 with two stalled evals behind them.
    extra = ("train.eval_every=4", "train.early_stopping.patience=0", "checkpoint.every_steps=2")
    straight = tmp_path / "straight"
    tenure(*args(straight, data, 60, *extra))
    run_dir = tmp_path / "stopped"
    proc = start(*args(run_dir, data, 60, *extra))
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "26").is_dir():  # stopped between the evals of steps 24 and 36
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 26"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert len(stopped) == 1, out[-2000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 26 <= step < 60 and (run_dir / "checkpoints" / str(step)).is_dir()
    result = tenure(*args(run_dir, data, 60, *extra))
    assert f"resumed from step {step}" in result.stdout
    assert summary(run_dir)["train_loss"] == summary(straight)["train_loss"]
    # The first eval after the resume takes its train loss over every step since the last eval, and
    # the overfitting monitor counts the stalled evals before the stop, as without the stop.
    resumed, unbroken = summary(run_dir), summary(straight)
    assert resumed["evals"] == unbroken["evals"] and "validation/generalization_gap" in resumed["evals"][0]
    assert resumed["overfit_warnings"] == unbroken["overfit_warnings"]
    assert {"step": 28, "stage": 0} in unbroken["overfit_warnings"] and unbroken["overfit_warnings"][-1]["step"] > step


@pytest.mark.slow
def test_busy_run_dir_and_config_drift_are_refused(data, tmp_path):
    run_dir = tmp_path / "run"
    tenure(*args(run_dir, data, 4))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # A change that breaks the run: refused, one line naming the key, checkpoints untouched.
    result = tenure(*args(run_dir, data, 6, "optim.lr=5e-4"), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "optim.lr: 0.001 -> 0.0005" in result.stderr and "--restart" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    # More steps is safe: a note, and the run goes on from step 4.
    result = tenure(*args(run_dir, data, 6))
    assert "note: resume: train.steps: 4 -> 6" in result.stdout and "resumed from step 4" in result.stdout
    # Two runs on one run dir: the second is refused, naming the first one's pid.
    proc = start(*args(run_dir, data, 400, "--restart"))
    try:
        wait_for_training(proc, run_dir)
        result = tenure(*args(run_dir, data, 400), check=False)
        assert result.returncode == 2 and f"is in use by pid {proc.pid}" in result.stderr
    finally:
        proc.kill()
        proc.wait()
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and len(json.loads((old[0] / "summary.json").read_text())["train_loss"]) == 6
    assert {"4", "6"} <= {p.name for p in (old[0] / "checkpoints").iterdir()}


@pytest.mark.slow
def test_divergence_halts_before_a_blown_up_update_is_saved(data, tmp_path):
    """Warm-up to lr=1000: step 1 has lr 0 and is saved; step 2's loss is still finite but its
    update would move every weight by ~100. The guard refuses it on device, the run stops naming
    the step and the reason, step 2 is never saved, and a rerun resumes from step 1."""
    run_dir = tmp_path / "run"
    diverging = args(run_dir, data, 6, "checkpoint.every_steps=1", "optim.lr=1000", "optim.warmup_steps=10",
                     "optim.warmup_ratio=0", "optim.schedule=linear")
    result = tenure(*diverging, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "step 2: update larger than the weights" in result.stderr
    assert "that update was not applied or saved; a rerun resumes from checkpoint step 1" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_compiled_steps_are_reused_across_runs_and_a_torn_cache_entry_is_recompiled(data, tmp_path):
    """`tenure train` keeps its compiled steps in TENURE_COMPILATION_CACHE: a second run of the same
    config reads every entry the first one wrote (jax stamps an entry's access time on each hit)
    and ends with the same losses and scores; entries cut in half (a kill mid-write) are
    recompiled, never a failed run. (Which executables get cached depends on their compile time
    passing 0.5 s, which varies on a loaded host: the test checks reads, not the entry count.)"""
    cache = tmp_path / "xla"

    def run(name):
        result = subprocess.run([sys.executable, "-m", "tenure.engine.cli", *args(tmp_path / name, data, 4)], cwd=ROOT,
                                env={**env(), "TENURE_COMPILATION_CACHE": str(cache)}, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        s = summary(tmp_path / name)
        return result, {k: s[k] for k in ("train_loss", "final", "baseline")}

    _, first = run("first")
    entries = {p.name: p.stat().st_size for p in cache.glob("*-cache")}
    assert entries, "no compiled step was cached"
    second_run_start = time.time_ns()
    _, again = run("again")
    assert again == first
    for name, size in entries.items():
        assert (cache / name).stat().st_size == size
        stamp = int.from_bytes((cache / name.replace("-cache", "-atime")).read_bytes(), "little")
        assert stamp >= second_run_start, f"{name} was not read by the second run"
    for name, size in entries.items():
        with open(cache / name, "r+b") as f:
            f.truncate(size // 2)
    torn, after = run("torn")
    assert after == first
    assert "Error reading persistent compilation cache entry" in torn.stderr
