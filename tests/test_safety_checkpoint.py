"""Run safety of checkpoints (issue 10): the engine only deletes what it wrote, never saves
a non-finite state, and reports a full disk as one line naming the path and the cause."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.engine.runtime.checkpoint import (MARKER, CheckpointConfig, Checkpointer, NonFiniteStateError,
                                              nonfinite_leaves)
from tenure.models.errors import TenureError
from tests.fs_helpers import mounted_tmpfs


def state(value=1.0, size=4):
    return {"params": {"w": jnp.full((size,), value), "b": jnp.zeros(2)}, "step": jnp.asarray(1, jnp.int32)}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_users_folders_are_refused_and_left_alone(tmp_path):
    (tmp_path / "2023").mkdir()
    (tmp_path / "2024").mkdir()
    (tmp_path / "2024" / "holiday.jpg").write_bytes(b"\xff\xd8photo")
    with pytest.raises(TenureError) as err:
        Checkpointer(CheckpointConfig(every_steps=1, keep=1), tmp_path)
    assert str(err.value) == (
        f"checkpoint.dir {tmp_path} is not empty (2023, 2024) and is not a tenure checkpoint directory "
        f"(no {MARKER}); tenure deletes old steps in its checkpoint directory, so choose a new or "
        "empty directory")
    assert sorted(os.listdir(tmp_path)) == ["2023", "2024"]
    assert (tmp_path / "2024" / "holiday.jpg").read_bytes() == b"\xff\xd8photo"


def test_marker_written_and_directory_reused(tmp_path):
    directory = tmp_path / "ck"
    with Checkpointer(CheckpointConfig(every_steps=1, keep=1), directory) as ckpt:
        ckpt.save(1, state())
        ckpt.wait()
    marker = json.loads((directory / MARKER).read_text())
    assert marker["written_by"] == "tenure" and marker["pid"] == os.getpid()
    with Checkpointer(CheckpointConfig(every_steps=1, keep=1), directory) as again:  # ours: accepted
        again.save(2, state(2.0))
        again.wait()
        assert again.all_steps() == [2]
    assert sorted(os.listdir(directory)) == ["2", MARKER]
    # An empty existing directory is fine too; a file is not.
    (tmp_path / "empty").mkdir()
    Checkpointer(CheckpointConfig(), tmp_path / "empty").close()
    assert (tmp_path / "empty" / MARKER).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TenureError, match=f"^checkpoint.dir {tmp_path}/file is a file, not a directory$"):
        Checkpointer(CheckpointConfig(), tmp_path / "file")


def test_checkpoint_dirs_from_before_the_marker_are_adopted(tmp_path):
    with Checkpointer(CheckpointConfig(every_steps=1), tmp_path) as ckpt:
        ckpt.save(1, state(), extra={"step": 1})
        ckpt.wait()
    (tmp_path / MARKER).unlink()  # what an older tenure left behind: step dirs only
    with Checkpointer(CheckpointConfig(every_steps=1), tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
    assert (tmp_path / MARKER).is_file()


def test_reading_never_writes_a_marker(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    ckpt, _ = Checkpointer.open(tmp_path)
    assert ckpt.all_steps() == [] and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_non_finite_state_is_never_saved(tmp_path):
    with Checkpointer(CheckpointConfig(every_steps=1, keep=1), tmp_path) as ckpt:
        ckpt.save(1, state(1.0))
        ckpt.wait()
        blown = state(1.0)
        blown["params"]["w"] = blown["params"]["w"].at[2].set(jnp.inf)
        blown["params"]["b"] = blown["params"]["b"].at[0].set(jnp.nan)
        with pytest.raises(NonFiniteStateError) as err:
            ckpt.save(2, blown)
        assert str(err.value) == (f"checkpoint step 2 not saved: non-finite values in 2 arrays "
                                  f"(first: params/b); the newest saved checkpoint is step 1 in {tmp_path}")
        assert (err.value.step, err.value.leaves) == (2, ["params/b", "params/w"])
        ckpt.wait()
        assert ckpt.all_steps() == [1]  # keep=1 did not evict the good step
        restored, _, _ = ckpt.restore(1, abstract(state()))
        np.testing.assert_array_equal(restored["params"]["w"], np.ones(4))
        # Skipped by every_steps: no check, no save, no error.
        assert not Checkpointer(CheckpointConfig(every_steps=10), tmp_path / "other").save(3, blown)


def test_nonfinite_leaves_ignores_integers_and_names_paths():
    tree = {"a": jnp.arange(3), "b": {"c": jnp.asarray([1.0, -jnp.inf])}, "k": jax.random.key(0)}
    assert nonfinite_leaves(tree) == ["b/c"]
    assert nonfinite_leaves({"a": jnp.ones(2, jnp.bfloat16)}) == []


def test_disk_full_at_checkpoint_is_one_line_and_keeps_the_last_step(tmp_path, capfd):
    with mounted_tmpfs(tmp_path / "small", size="256k") as small:
        directory = small / "ck"
        with Checkpointer(CheckpointConfig(every_steps=1, keep=1), directory) as ckpt:
            ckpt.save(1, state(), {"next": 1})
            ckpt.wait()
            big = state()
            big["params"]["w"] = jax.random.normal(jax.random.key(0), (300_000,))  # ~1.2 MB, incompressible
            with pytest.raises(TenureError) as err:
                ckpt.save(2, big, {"next": 2})
                ckpt.wait()
            message = str(err.value)
            assert message.startswith(f"checkpoint save to {directory} failed: ")
            assert "[Errno 28] No space left on device: " + str(directory / "2.orbax-checkpoint-tmp") in message
            assert "\n" not in message
            assert ckpt.all_steps() == [1]
            restored, data, _ = ckpt.restore(1, abstract(state()))
            assert data == {"next": 1}
    assert "Traceback" not in capfd.readouterr().err  # orbax's thread tracebacks are not shown


def test_tenure_train_refuses_a_users_folder_as_checkpoint_dir(tmp_path):
    """The reported case end to end: checkpoint.dir = a folder of year folders, resume=false."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    photos = tmp_path / "photos"
    for year in ("2023", "2024"):
        (photos / year).mkdir(parents=True)
        (photos / year / "img.jpg").write_bytes(year.encode())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i}", "label": "ab"[i % 2]}) + "\n" for i in range(16)))
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    result = subprocess.run(
        [sys.executable, "-m", "tenure.engine.cli", "train", "configs/tasks/seq_cls.yaml",
         f"model.path={root}/tests/fixtures/bert/seq_cls", f"run_dir={tmp_path}/run", f"data.train={data}",
         "data.validation=null", "data.test=null", "data.max_length=16", "data.length_buckets=[16]",
             "data.batch_size=4", "train.steps=2",
         f"checkpoint.dir={photos}", "train.resume=false", "logging.progress=false"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint.dir {photos} is not empty (2023, 2024) and is not a tenure checkpoint directory")
    assert sorted(os.listdir(photos)) == ["2023", "2024"]
    assert [(photos / y / "img.jpg").read_bytes() for y in ("2023", "2024")] == [b"2023", b"2024"]


ERROR_EXIT = """
import sys, jax
from tenure.engine.runtime.checkpoint import CheckpointConfig, Checkpointer
from tenure.models.errors import TenureError
try:
    with Checkpointer(CheckpointConfig(every_steps=1), sys.argv[1]) as ckpt:
        ckpt.save(1, {"w": jax.random.normal(jax.random.key(0), (2_000_000,))})  # async, 8 MB
        raise TenureError("step 2: something went wrong")
except TenureError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
"""


def test_error_exit_waits_for_the_save_in_flight(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    result = subprocess.run([sys.executable, "-c", ERROR_EXIT, str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.strip()) == (2, "error: step 2: something went wrong")
    assert sorted(os.listdir(tmp_path)) == ["1", MARKER]
    with Checkpointer(CheckpointConfig(), tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
