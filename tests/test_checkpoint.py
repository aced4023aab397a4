"""Orbax checkpoints: round trip, resharding, keep-best, atomic saves, corrupt-step fallback."""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from tenure.engine.runtime import checkpoint as ckpt_lib
from tenure.engine.runtime.checkpoint import CheckpointConfig, Checkpointer
from tenure.models.errors import TenureError


def make_state(scale: float = 1.0) -> dict:
    return {
        "params": {"w": jnp.arange(32.0).reshape(8, 4) * scale, "b": jnp.ones(4) * scale},
        "step": jnp.asarray(int(scale), jnp.int32),
    }


def abstract_like(state, sharding_fn=lambda x: x.sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def assert_state_equal(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_array_equal(np.asarray(a), np.asarray(e)), actual, expected)


def test_config_defaults_and_unknown_key():
    cfg = CheckpointConfig()
    assert (cfg.every_steps, cfg.keep, cfg.keep_best, cfg.async_save) == (1000, 3, False, True)
    assert cfg.resolved_dir("/runs/a") == Path("/runs/a/checkpoints")
    assert CheckpointConfig(dir="/x").resolved_dir("/runs/a") == Path("/x")
    with pytest.raises(ValueError, match="keep_lastt"):
        CheckpointConfig(keep_lastt=2)


def test_round_trip_state_data_and_extra(tmp_path):
    cfg = CheckpointConfig(every_steps=2, keep=5)
    rng_key_data = jax.random.key_data(jax.random.key(7))
    with Checkpointer(cfg, tmp_path / "ck") as ckpt:
        assert not ckpt.save(1, make_state(1.0))  # not even the first step of a fresh run
        assert ckpt.save(2, make_state(2.0), {"next_index": 17}, {"rng": rng_key_data, "labels": ["neg", "pos"]})
        assert not ckpt.save(3, make_state(3.0))  # not a multiple of every_steps
        assert ckpt.save(3, make_state(3.0), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        assert ckpt.latest_step() == 3
        state, data_state, extra = ckpt.restore(2, abstract_like(make_state()))
    assert_state_equal(state, make_state(2.0))
    assert data_state == {"next_index": 17}
    assert extra == {"rng": np.asarray(rng_key_data).tolist(), "labels": ["neg", "pos"]}
    # Data state is per process, as JSON keyed by process index and count.
    data_file = tmp_path / "ck" / "2" / "data" / "process_0-of-1.json"
    assert json.loads(data_file.read_text()) == {"next_index": 17}
    reopened, _ = Checkpointer.open(tmp_path / "ck")
    state, data_state, extra = reopened.restore(abstract_state=abstract_like(make_state()))
    assert_state_equal(state, make_state(3.0))
    assert (data_state, extra) == (None, {})


def test_restore_into_a_different_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    fsdp = NamedSharding(mesh, P("fsdp"))
    replicated_1dev = SingleDeviceSharding(jax.devices()[0])
    expected = make_state(5.0)
    sharded = {
        "params": {
            "w": jax.device_put(expected["params"]["w"], fsdp),
            "b": jax.device_put(expected["params"]["b"], NamedSharding(mesh, P())),
        },
        "step": expected["step"],
    }
    with Checkpointer(CheckpointConfig(every_steps=1), tmp_path / "a") as ckpt:
        ckpt.save(1, sharded)
        ckpt.wait()
        state, _, _ = ckpt.restore(1, abstract_like(expected, lambda x: replicated_1dev))
    assert_state_equal(state, expected)
    assert state["params"]["w"].sharding == replicated_1dev

    single = jax.device_put(expected, replicated_1dev)
    with Checkpointer(CheckpointConfig(every_steps=1), tmp_path / "b") as ckpt:
        ckpt.save(1, single)
        ckpt.wait()
        target = abstract_like(expected, lambda x: fsdp if x.ndim == 2 else NamedSharding(mesh, P()))
        state, _, _ = ckpt.restore(1, target)
    assert_state_equal(state, expected)
    assert state["params"]["w"].sharding == fsdp
    assert [s.data.shape for s in state["params"]["w"].addressable_shards] == [(1, 4)] * 8


@pytest.mark.parametrize("mode, accuracies, kept, best", [
    ("max", [0.5, 0.9, 0.7, 0.6], [2, 4], 2),
    ("min", [0.5, 0.9, 0.7, 0.6], [1, 4], 1),
])
def test_keep_best_keeps_best_and_latest(tmp_path, mode, accuracies, kept, best):
    cfg = CheckpointConfig(every_steps=1, keep=1, keep_best=True)
    with Checkpointer(cfg, tmp_path, best_mode=mode) as ckpt:
        for step, acc in enumerate(accuracies, start=1):
            ckpt.save(step, make_state(step), metrics={"validation/accuracy": acc, "train/loss": 1.0})
        ckpt.wait()
        assert ckpt.all_steps() == kept
        assert ckpt.best_step() == best
        assert ckpt.latest_step() == 4
    with Checkpointer(cfg, tmp_path, best_mode=mode) as reopened:  # the ranking survives a restart
        assert reopened.best_step() == best
        state, _, extra = reopened.restore(best, abstract_like(make_state()))
    assert_state_equal(state, make_state(best))
    assert extra["metrics"]["validation/accuracy"] == accuracies[best - 1]


def test_eval_and_export_default_to_the_runs_result_not_a_staged_runs_best(tmp_path):
    """`tenure eval` / `export` / lm-eval `checkpoint=RUN_DIR` without a step: a staged run's best
    checkpoint ranks stages by their own tasks' scores (here stage A's step 2 above stage B's
    steps), so it is not the run's result; the newest is, or the step its summary.json names (a
    forgetting guard's pinned pick). A run that ends on its best checkpoint keeps it."""
    from tenure.engine.tools.commands import result_step

    cfg = CheckpointConfig(every_steps=1, keep=5, keep_best=True)
    with Checkpointer(cfg, tmp_path / "checkpoints") as ckpt:
        for step, score in enumerate([0.5, 0.9, 0.3, 0.4], start=1):
            ckpt.save(step, make_state(step), metrics={"validation/accuracy": score})
        ckpt.wait()
        assert ckpt.best_step() == 2
        assert (result_step(ckpt, ends_on_best=False), result_step(ckpt, ends_on_best=True)) == (4, 2)
        (tmp_path / "summary.json").write_text(json.dumps({"best_step": 3, "checkpoints": "checkpoints"}))
        assert result_step(ckpt, ends_on_best=False) == 3
        (tmp_path / "summary.json").write_text(json.dumps({"best_step": 9, "checkpoints": "checkpoints"}))
        assert result_step(ckpt, ends_on_best=False) == 4  # a step no longer kept

def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    with Checkpointer(CheckpointConfig(every_steps=1, keep=1), tmp_path) as ckpt:
        ckpt.save(1, make_state(1.0), {"next_index": 1})
        ckpt.wait()

        def disk_full(self, directory, args):
            (Path(directory) / "partial.json").write_text("{")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ckpt_lib._ProcessJsonHandler, "save", disk_full)
        with pytest.raises(TenureError) as err:
            ckpt.save(2, make_state(2.0), {"next_index": 2})
            ckpt.wait()
        assert str(err.value) == (
            f"checkpoint save of step 2 to {tmp_path} failed: OSError: [Errno 28] No space left on device"
        )
        assert ckpt.all_steps() == [1]  # keep=1 did not evict the last good step
    monkeypatch.undo()
    with Checkpointer(CheckpointConfig(every_steps=1, keep=1), tmp_path) as reopened:
        assert reopened.all_steps() == [1]
        state, data_state, _ = reopened.restore(abstract_state=abstract_like(make_state()))
        assert_state_equal(state, make_state(1.0))
        assert data_state == {"next_index": 1}
        reopened.save(2, make_state(2.0), {"next_index": 2})  # the same step saves fine later
        reopened.wait()
        assert reopened.all_steps() == [2]


def test_interrupted_save_is_invisible_and_cleaned_up(tmp_path, monkeypatch):
    import asyncio

    from orbax.checkpoint._src.path import temporary_paths
    cleanup = temporary_paths.cleanup_temporary_paths

    async def slow_cleanup(*args, **kwargs):  # as on a loaded host: orbax's cleanup thread runs late
        await asyncio.sleep(1)
        return await cleanup(*args, **kwargs)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
    with Checkpointer(CheckpointConfig(every_steps=1), tmp_path) as ckpt:
        ckpt.save(1, make_state(1.0))
        ckpt.wait()
    # What a process killed mid-save leaves behind: a half-written temporary step directory.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_bytes(b'{"tree_metadata": {')
    with Checkpointer(CheckpointConfig(every_steps=1), tmp_path) as reopened:
        assert reopened.latest_step() == 1
        state, _, _ = reopened.restore(abstract_state=abstract_like(make_state()))
        assert_state_equal(state, make_state(1.0))
    assert sorted(os.listdir(tmp_path)) == ["1", ckpt_lib.MARKER]


def _save_steps(directory, steps):
    with Checkpointer(CheckpointConfig(every_steps=1, keep=5), directory) as ckpt:
        for step in steps:
            ckpt.save(step, make_state(step), {"next_index": step}, {"step": step})
        ckpt.wait()


# A failed orbax restore leaves an un-awaited tensorstore coroutine behind: orbax's noise, not ours.
@pytest.mark.filterwarnings(
    "ignore:coroutine .* was never awaited:RuntimeWarning",
    "ignore::pytest.PytestUnraisableExceptionWarning",
)
def test_corrupt_checkpoint_names_path_and_step_and_falls_back(tmp_path):
    _save_steps(tmp_path, [1, 2, 3])
    for chunk in (tmp_path / "3" / "state" / "d").iterdir():
        data = bytearray(chunk.read_bytes())
        data[-3] ^= 0xFF  # one flipped byte: the OCDBT checksum catches it
        chunk.write_bytes(bytes(data))
    (tmp_path / "2" / "extra" / "metadata").unlink()
    ckpt = Checkpointer(CheckpointConfig(keep=5), tmp_path)
    with pytest.raises(TenureError) as err:
        ckpt.restore(3, abstract_like(make_state()))
    message = str(err.value)
    assert message.startswith(f"checkpoint {tmp_path}/3 (step 3) is unreadable: ValueError: DATA_LOSS: ")
    assert "\n" not in message
    logged = []
    state, data_state, extra = ckpt.restore_latest_good(lambda extra: abstract_like(make_state()), log=logged.append)
    assert (ckpt.restored_step, data_state, extra) == (1, {"next_index": 1}, {"step": 1})
    assert_state_equal(state, make_state(1.0))
    assert [line.split(": ", 1)[0] for line in logged] == [
        "skipping checkpoint step 3", "skipping checkpoint step 2",
    ]
    assert logged[1] == (
        f"skipping checkpoint step 2: checkpoint {tmp_path}/2 (step 2) is unreadable: "
        f"FileNotFoundError: File {tmp_path}/2/extra/metadata not found."
    )


def test_missing_paths_and_missing_data_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TenureError, match=f"^checkpoint directory not found: {missing} \\(give a run dir, its "
                                          r"checkpoints dir or one step's dir, e.g. RUN/checkpoints/200\)$"):
        Checkpointer.open(missing)
    with pytest.raises(TenureError, match=f"^no checkpoint found in {tmp_path}$"):
        Checkpointer(None, tmp_path).restore()
    run_dir = tmp_path / "run"
    _save_steps(run_dir / "checkpoints", [4])
    ckpt, step = Checkpointer.open(run_dir)
    assert (ckpt.directory, step, ckpt.latest_step()) == (run_dir / "checkpoints", None, 4)
    ckpt, step = Checkpointer.open(run_dir / "checkpoints" / "4")
    assert (ckpt.directory, step) == (run_dir / "checkpoints", 4)
    with pytest.raises(TenureError, match=f"^checkpoint step 9 not found in {run_dir}/checkpoints$"):
        ckpt.restore(9)
    (run_dir / "checkpoints" / "4" / "data" / "process_0-of-1.json").unlink()
    with pytest.raises(TenureError) as err:
        ckpt.restore(4, abstract_like(make_state()))
    assert str(err.value) == (
        f"checkpoint {run_dir}/checkpoints/4 (step 4) is unreadable: "
        f"{run_dir}/checkpoints/4/data/process_0-of-1.json missing "
        "(was it written with a different process count?)"
    )


MULTIPROCESS_WORKER = r'''
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
pid, port, directory, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tenure.engine.runtime.checkpoint import CheckpointConfig, Checkpointer

mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
w_np = np.arange(32.0, dtype=np.float32).reshape(8, 4)
def state_at(step, sharding):
    return {"w": jax.make_array_from_callback((8, 4), sharding, lambda idx: w_np[idx] * step)}
fsdp = NamedSharding(mesh, P("fsdp"))
with Checkpointer(CheckpointConfig(every_steps=1), directory) as ckpt:
    for step in (1, 2):
        ckpt.save(step, state_at(step, fsdp), {"next_index": 10 * step + pid}, {"labels": ["a", "b"]})
    ckpt.wait()
    multihost_utils.sync_global_devices("saved")
    if pid == 1:  # only process 1 loses its data-iterator state of step 2
        import os
        os.remove(f"{directory}/2/data/process_1-of-2.json")
    multihost_utils.sync_global_devices("corrupted")
    replicated = NamedSharding(mesh, P())
    target = {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=replicated)}
    logged = []
    state, data_state, extra = ckpt.restore_latest_good(lambda extra: target, log=logged.append)
    step = ckpt.restored_step
    w = np.asarray(state["w"].addressable_data(0))
json.dump({"step": step, "w_equal": bool((w == w_np).all()), "data": data_state, "extra": extra,
           "logged": logged}, open(out, "w"))
'''


@pytest.mark.multiprocess
def test_two_processes_save_per_process_data_and_agree_on_fallback(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    worker = tmp_path / "worker.py"
    worker.write_text(MULTIPROCESS_WORKER)
    ckpt_dir = tmp_path / "ck"
    env = {key: value for key, value in os.environ.items() if key != "JAX_NUM_CPU_DEVICES"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), port, str(ckpt_dir), str(tmp_path / f"out{pid}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for pid in (0, 1)
    ]
    logs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    results = [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in (0, 1)]
    data_files = sorted(path.name for path in (ckpt_dir / "1" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    for pid, result in enumerate(results):
        assert (result["step"], result["w_equal"]) == (1, True)
        assert result["data"] == {"next_index": 10 + pid}
        assert result["extra"] == {"labels": ["a", "b"]}
    assert results[0]["logged"] == ["skipping checkpoint step 2: unreadable on another process"]
    assert results[1]["logged"] == [
        f"skipping checkpoint step 2: checkpoint {ckpt_dir}/2 (step 2) is unreadable: "
        f"{ckpt_dir}/2/data/process_1-of-2.json missing (was it written with a different "
        "process count?)"
    ]
