"""Multi-host made checkable: `tenure train` as real JAX processes on localhost, compared with
one process holding the same number of devices; checkpoints restored into other topologies.

Every run here is a real `python -m tenure.engine.cli train` process with its own simulated CPU
devices (JAX_NUM_CPU_DEVICES) and real orbax checkpoints."""
import itertools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(tmp_path, rows=64) -> list[str]:
    for split, n in (("train", rows), ("validation", 16), ("test", 16)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(itertools.islice(open(ROOT / f"data/wordnet_lexnames/{split}.jsonl"), n)))
    return [f"data.{s}={tmp_path / s}.jsonl" for s in ("train", "validation", "test")]


def train_args(tmp_path, run_dir, *overrides) -> list[str]:
    """A small deterministic run: no shuffle, no dropout, no length grouping (several processes pad
    to one width, so they never group), so 1 and 2 processes see the same batches."""
    return [sys.executable, "-m", "tenure.engine.cli", "train", "configs/tasks/seq_cls.yaml",
            f"model.path={ROOT / 'tests/fixtures/bert/seq_cls'}", f"run_dir={run_dir}", *_data(tmp_path),
            "data.max_length=32", "data.batch_size=8", "data.eval_batch_size=8", "data.shuffle=false", "data.group_by_length=0",
            "model.dropout=0.0", "optim.lr=1e-3", "logging.progress=false", "logging.tensorboard=false",
            *overrides]


def start(args, *, processes: int, devices: int, env_extra=None) -> list[subprocess.Popen]:
    """Starts `args` as `processes` JAX processes (each with `devices` CPU devices)."""
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", **(env_extra or {}))
        for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            env.pop(key, None)
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs, timeout=300) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) per process."""
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def launch(args, *, processes: int, devices: int, timeout=300, env_extra=None) -> list[tuple[int, str, str]]:
    return finish(start(args, processes=processes, devices=devices, env_extra=env_extra), timeout)


def _ok(results):
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return results


def restore_on_one_device(step_dir: pathlib.Path) -> dict:
    """A checkpoint's train state as host arrays, restored in this (single) process onto one device,
    whatever topology wrote it."""
    import jax

    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(step_dir / "state")
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = checkpointer.restore(step_dir / "state", target)
    checkpointer.close()
    return jax.tree.map(np.asarray, state)


def _shift_invariant(key: str) -> bool:
    """Attention key biases: softmax is invariant to adding q.b_k to every key of a query, so their
    gradient is 0 in exact arithmetic and rounding noise (~1e-9) in practice; Adam scales that noise
    to +-lr steps whose sign depends on summation order, so they are not comparable across layouts."""
    return ("attention/key/bias" in key or ("attention.self.key.bias" in key)) and "mu/" not in key \
        and "nu/" not in key


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, prefix + (str(k),))
    elif isinstance(tree, (list, tuple)):
        for k, v in enumerate(tree):
            yield from _flat(v, prefix + (str(k),))
    elif tree is not None:
        yield "/".join(prefix), tree


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_equal_one_process_with_the_same_devices(tmp_path):
    """2 processes x 2 devices == 1 process x 4 devices: per-step loss, checkpointed state, export."""
    two, one = tmp_path / "two", tmp_path / "one"
    common = ("train.steps=6", "train.eval_every=100", "checkpoint.every_steps=3")
    # Both runs at once (3 processes): they share nothing but the data files.
    two_procs = start(train_args(tmp_path, two, *common), processes=2, devices=2)
    one_procs = start(train_args(tmp_path, one, *common), processes=1, devices=4)
    results = _ok(finish(two_procs) + finish(one_procs))
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in results[0][1] and "mesh {'data': 4" in results[2][1]
    s2 = json.loads((two / "summary.json").read_text())
    s1 = json.loads((one / "summary.json").read_text())
    assert len(s2["train_loss"]) == len(s1["train_loss"]) == 6
    # The losses move (lr 1e-3), so equality is not trivially the starting loss six times.
    assert abs(s1["train_loss"][-1] - s1["train_loss"][0]) > 1e-2
    np.testing.assert_allclose(s2["train_loss"], s1["train_loss"], rtol=2e-5, atol=2e-6)
    for key in s1["final"]:
        np.testing.assert_allclose(s2["final"][key], s1["final"][key], rtol=1e-5, atol=1e-6)
    # The 2-process checkpoint (written by both processes) restored here, in one process.
    state2 = dict(_flat(restore_on_one_device(two / "checkpoints" / "6")))
    state1 = dict(_flat(restore_on_one_device(one / "checkpoints" / "6")))
    assert state2.keys() == state1.keys() and any(k.startswith("params/") for k in state1)
    for key, value in state1.items():
        if _shift_invariant(key):
            continue
        np.testing.assert_allclose(state2[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    initial = load_file(str(ROOT / "tests/fixtures/bert/seq_cls/model.safetensors"))
    h2, h1 = load_file(str(two / "hf/model.safetensors")), load_file(str(one / "hf/model.safetensors"))
    assert h2.keys() == h1.keys()
    moved = 0.0
    for key in h1:
        if _shift_invariant(key):
            continue
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-4, atol=1e-6, err_msg=key)
        if key in initial and initial[key].shape == h1[key].shape:
            moved = max(moved, float(np.max(np.abs(h1[key] - initial[key]))))
    assert moved > 1e-4  # training changed the weights being compared


@pytest.mark.slow
@pytest.mark.multiprocess
def test_checkpoint_resumes_on_other_topologies_with_the_same_next_loss(tmp_path):
    """A step-4 checkpoint from 4 devices (data=2, fsdp=2) continues on 1 device and on 8 (fsdp=8):
    step 5's loss equals the one the 4-device run took itself."""
    ref = tmp_path / "ref"
    common = ("train.steps=5", "train.eval_every=100", "checkpoint.every_steps=4")
    out = _ok(launch(train_args(tmp_path, ref, *common, "mesh.data=2", "mesh.fsdp=2"), processes=1, devices=4))[0][1]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out
    ref_losses = json.loads((ref / "summary.json").read_text())["train_loss"]
    assert len(ref_losses) == 5
    losses, procs = {}, {}
    meshes = {"one": "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}", "eight": "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}"}
    for name, devices, mesh in (("one", 1, ()), ("eight", 8, ("mesh.data=1", "mesh.fsdp=8"))):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref / "checkpoints" / "4", run / "checkpoints" / "4")
        procs[name] = start(train_args(tmp_path, run, *common, *mesh), processes=1, devices=devices)
    for name, started in procs.items():  # both continuations run at once
        out = _ok(finish(started))[0][1]
        assert "resumed from step 4" in out and meshes[name] in out
        losses[name] = json.loads((tmp_path / name / "summary.json").read_text())["train_loss"]
    for name, got in losses.items():
        assert len(got) == 5, name
        np.testing.assert_allclose(got[:4], ref_losses[:4], rtol=0, atol=0)  # the history, carried over
        np.testing.assert_allclose(got[4], ref_losses[4], rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_process_makes_the_other_exit_naming_it(tmp_path):
    """Kill process 1 of 2 mid-run: process 0 leaves its collective within the hang-guard timeout,
    with one line naming process 1 (not a silent hang). (Killing process 0 instead was run once
    with this test: JAX's own error polling aborts process 1 at once, see engine/runtime/hangguard.py.)"""
    victim = 1
    import signal
    import time

    run = tmp_path / "run"
    args = train_args(tmp_path, run, "train.steps=100000", "train.eval_every=100000", "checkpoint.every_steps=2")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu", TENURE_HANG_TIMEOUT="5",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "2").is_dir():  # training is under way
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-3000:]
            time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [l for l in err.splitlines() if l.startswith("hang guard:")]
    assert waited < 5 + 10  # the timeout, plus one beat and start-up slack
    assert survivor.returncode == 75, err[:2000] + "\n...\n" + err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("hang guard: process 1 of 2 has not answered for"), lines
    assert lines[0].endswith(f"process {1 - victim} exits")
