"""`tenure train` as two JAX processes on localhost (2 CPU devices each, gloo collectives):
the same program on every process, one global mesh, per-process data shards, one writer."""
import itertools
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_training(tmp_path):
    for split, rows in (("train", 400), ("validation", 32), ("test", 32)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(itertools.islice(open(ROOT / f"data/wordnet_lexnames/{split}.jsonl"), rows)))
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "tenure.engine.cli", "train", "configs/tasks/seq_cls.yaml",
            f"model.path={ROOT / 'tests/fixtures/bert/seq_cls'}", f"run_dir={run_dir}",
            *(f"data.{s}={tmp_path / s}.jsonl" for s in ("train", "validation", "test")),
            "data.max_length=32", "data.batch_size=8", "data.eval_batch_size=16", "train.steps=6",
            "train.eval_every=3", "checkpoint.every_steps=3", "optim.lr=1e-3", "logging.progress=false"]
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), JAX_NUM_CPU_DEVICES="2")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in outs[0][0]
    # Only process 0 prints. Gloo announces its connections on every process, from several threads,
    # so its lines can arrive cut ("Expected number of connected peer ranks is : 3", a bare "1");
    # tenure never prints a bare number or "peer ranks".
    own_lines = [l for l in outs[1][0].splitlines()
                 if "[Gloo]" not in l and "peer ranks" not in l and not l.strip().isdigit()]
    assert own_lines == [] and "mesh" not in outs[1][0] and "step" not in outs[1][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["train_loss"]) == 6 and np.all(np.isfinite(summary["train_loss"]))
    assert {"test/accuracy", "validation/accuracy"} <= set(summary["final"])
    step_dir = run_dir / "checkpoints" / "6"
    assert sorted(p.name for p in step_dir.rglob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]  # each process's data-iterator position
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "hf" / "model.safetensors").is_file()
