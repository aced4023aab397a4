"""Run safety, second round (issue 25), through the real CLI on the tiny BERT fixture: no run is
lost to another run or to a rerun, and each refusal is one line, exit code 2, with every file
of the earlier run unchanged (byte comparison). One tiny finished run, with its checkpoint dir
outside the run dir, is shared by the tests that need one."""
import json
import pathlib
import shutil

import pytest

from test_run_safety import args
from test_safety_inputs import staged
from test_train_loop import data  # noqa: F401  (the `data` fixture)
from tests.cli_helpers import tenure
from tests.fs_helpers import mounted_tmpfs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"
STAGE_A_ONLY = 'stages=[{"tasks": ["A"], "steps": 2}]'


def files(*dirs) -> dict:
    """Every file under `dirs` (lock files aside: they record who holds them) -> its bytes."""
    return {p: p.read_bytes() for d in dirs for p in sorted(pathlib.Path(d).rglob("*"))
            if p.is_file() and not p.name.startswith(".tenure-lock")}


def refused(*argv) -> str:
    """The one line of a refused command (exit code 2, no traceback)."""
    result = tenure(*argv, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):  # noqa: F811
    """A finished 2-step run at `run` whose checkpoints live in `ckpts`, outside it."""
    root = tmp_path_factory.mktemp("finished")
    run_dir, ckpt_dir = root / "run", root / "ckpts"
    tenure(*args(run_dir, data, 2, f"checkpoint.dir={ckpt_dir}"))
    return run_dir, ckpt_dir


def test_a_checkpoint_dir_belongs_to_one_run(finished, data, tmp_path):  # noqa: F811
    run_dir, ckpt_dir = finished
    before = files(run_dir, ckpt_dir)
    line = refused(*args(tmp_path / "other", data, 2, f"checkpoint.dir={ckpt_dir}"))
    assert line.startswith(f"error: checkpoint.dir {ckpt_dir} belongs to the run in {run_dir} ")
    assert f"choose another checkpoint.dir, or resume that run with run_dir={run_dir}" in line
    assert files(run_dir, ckpt_dir) == before


def test_resume_false_on_a_finished_run_is_refused(finished, data):  # noqa: F811
    run_dir, ckpt_dir = finished
    before = files(run_dir, ckpt_dir)
    line = refused(*args(run_dir, data, 2, f"checkpoint.dir={ckpt_dir}", "train.resume=false"))
    assert line == (f"error: run_dir {run_dir} holds an earlier run ({ckpt_dir}, {run_dir}/summary.json, "
                    f"{run_dir}/forgetting.json, {run_dir}/hf) and train.resume=false would overwrite it: add --restart to move it aside "
                    "first, or --overwrite to replace it in place")
    assert files(run_dir, ckpt_dir) == before


def test_a_finished_run_without_its_checkpoints_is_not_trained_over(finished, data, tmp_path):  # noqa: F811
    """Its checkpoint dir changed (or deleted): the run would start at step 0 and overwrite the
    earlier results in place; refused, as train.resume=false is."""
    run_dir, ckpt_dir = finished
    before = files(run_dir, ckpt_dir)
    line = refused(*args(run_dir, data, 2, f"checkpoint.dir={tmp_path / 'elsewhere'}"))
    assert line == (f"error: run_dir {run_dir} holds an earlier run ({run_dir}/summary.json, {run_dir}/forgetting.json, "
                    f"{run_dir}/hf) and there is no checkpoint to resume from in {tmp_path / 'elsewhere'}, so starting over would "
                    "overwrite it: add --restart to move it aside first, or --overwrite to replace it in place")
    assert files(run_dir, ckpt_dir) == before


def test_a_resume_over_changed_training_files_is_refused(data, tmp_path):  # noqa: F811
    """The checkpoint's data position counts in the files it trained on: resuming over other
    contents would silently read another order; refused, the checkpoint untouched."""
    train_file = tmp_path / "train.jsonl"
    train_file.write_bytes(pathlib.Path(data["train"]).read_bytes())
    run_dir = tmp_path / "run"
    tenure(*args(run_dir, {**data, "train": train_file}, 2, "checkpoint.every_steps=2"))
    train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:200]))
    before = files(run_dir / "checkpoints")
    line = refused(*args(run_dir, {**data, "train": train_file}, 4, "checkpoint.every_steps=2"))
    assert line.startswith(f"error: {run_dir}: the config differs from the checkpoint's in 1 key that change the run: "
                           "data.train: its files changed since the checkpoint")
    assert files(run_dir / "checkpoints") == before


def test_restart_moves_an_outside_checkpoint_dir_aside_too(finished, data, tmp_path):  # noqa: F811
    """--restart with a changed lr starts over (no resume, no drift refusal) and the old run's
    files, checkpoints included, are kept byte for byte next to where they were."""
    src_run, src_ckpt = finished
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpts"  # a copy: the shared run stays as it is
    shutil.copytree(src_run, run_dir)
    shutil.copytree(src_ckpt, ckpt_dir)
    before_run, before_ckpt = files(run_dir), files(ckpt_dir)
    result = tenure(*args(run_dir, data, 2, f"checkpoint.dir={ckpt_dir}", "optim.lr=5e-4", "--restart"))
    assert "resumed from" not in result.stdout
    run_aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    ckpt_aside = [p for p in tmp_path.iterdir() if p.name.startswith("ckpts.old-")]
    assert len(run_aside) == 1 and len(ckpt_aside) == 1
    assert {p.relative_to(run_aside[0]): b for p, b in files(run_aside[0]).items()} == \
        {p.relative_to(run_dir): b for p, b in before_run.items()}
    assert {p.relative_to(ckpt_aside[0]): b for p, b in files(ckpt_aside[0]).items()} == \
        {p.relative_to(ckpt_dir): b for p, b in before_ckpt.items()}
    assert f"restart: the earlier run's checkpoint.dir is now {ckpt_aside[0]}" in result.stdout


def test_resume_false_with_overwrite_replaces_the_run_in_place(finished, data, tmp_path):  # noqa: F811
    src_run, src_ckpt = finished
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpts"
    shutil.copytree(src_run, run_dir)
    shutil.copytree(src_ckpt, ckpt_dir)
    result = tenure(*args(run_dir, data, 2, f"checkpoint.dir={ckpt_dir}", "train.resume=false", "optim.lr=5e-4",
                          "--overwrite"))
    assert f"overwrite: starting over in {run_dir}; the earlier run's checkpoints are deleted" in result.stdout
    assert "resumed from" not in result.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["ckpts", "run"]
    assert json.loads((run_dir / "summary.json").read_text())["train_loss"] != \
        json.loads((src_run / "summary.json").read_text())["train_loss"]  # lr 5e-4, not the first run's 1e-3


@pytest.mark.parametrize("run_dir", [".", ""])
def test_restart_of_the_current_directory_is_one_line(run_dir, data):  # noqa: F811
    line = refused(*args(run_dir, data, 2, "--restart"))
    if run_dir:
        assert line == (f"error: --restart: run_dir {ROOT} is the current directory or holds it, so everything "
                        "in it would be moved aside; give the run a run_dir of its own")
    else:
        assert line == ("error: configs/tasks/seq_cls.yaml: config key 'run_dir': String should have at least "
                        "1 character (got '')")


def test_eval_with_another_architecture_blames_the_model_path(finished, data):  # noqa: F811
    run_dir, ckpt_dir = finished
    gpt2 = ROOT / "tests/fixtures/gpt2"
    line = refused("eval", *args(run_dir, data, 2, f"checkpoint.dir={ckpt_dir}", f"model.path={gpt2}")[1:],
                   "--checkpoint", ckpt_dir)
    assert line == (f"error: {ckpt_dir}: the config differs from the one the checkpoint was trained with in 1 key "
                    f'that defines the model: model.path: trained "{TINY_BERT}", given "{gpt2}"; evaluate or export '
                    "the checkpoint with the config it was trained with")


def test_eval_refuses_a_changed_head_and_evaluates_with_other_data(finished, data, tmp_path):  # noqa: F811
    """The model is built from the config `tenure eval` is given: a head option (the pooling) must be the
    one the checkpoint was trained with; eval batch size and test split are the eval's own."""
    run_dir, ckpt_dir = finished
    config = args(run_dir, data, 2, f"checkpoint.dir={ckpt_dir}")[1:]
    line = refused("eval", *config, "task.pooling=mean", "--checkpoint", ckpt_dir)
    assert line == (f"error: {ckpt_dir}: the config differs from the one the checkpoint was trained with in 1 key "
                    'that defines the model: task.pooling: trained "cls", given "mean"; evaluate or export the '
                    "checkpoint with the config it was trained with")
    test = tmp_path / "test.jsonl"
    test.write_text("".join(data["test"].read_text().splitlines(keepends=True)[:20]))
    result = tenure("eval", *config, "data.eval_batch_size=4", f"data.test={test}", "--checkpoint", ckpt_dir)
    assert "test/accuracy: " in result.stdout


# -- staged runs: one run of the config cut to stage A, branched from ------------------------------------------

@pytest.fixture(scope="module")
def stage_a(tmp_path_factory, data):  # noqa: F811
    root = tmp_path_factory.mktemp("stage_a")
    tenure(*staged(root, data, STAGE_A_ONLY))
    return root / "run"


def test_every_r_column_names_its_split(stage_a):
    record = json.loads((stage_a / "forgetting.json").read_text())
    assert record["tasks"] == ["A", "B"] and record["split"] == {"A": "test", "B": "test"}
    summary = json.loads((stage_a / "summary.json").read_text())
    assert (summary["checkpoints"], summary["hf_export"], summary["tensorboard"]) == ("checkpoints", "hf", "tb")
    assert len(summary["stage_digests"]) == 1 and len(summary["stage_digests"][0]) == 64


def test_a_moved_run_is_branched_from_and_a_replaced_checkpoint_is_refused(stage_a, data, tmp_path):  # noqa: F811
    copy = pathlib.Path(shutil.copytree(stage_a, tmp_path / "copy"))
    moved = copy.rename(tmp_path / "moved")  # `mv`: nothing inside names where it was
    result = tenure(*staged(tmp_path / "branch", data, f"branch_from={moved}"))
    assert f"branched from {moved} after stage A" in result.stdout
    # The source's summary records another stage end than its checkpoint holds: refused, nothing changed.
    summary = json.loads((moved / "summary.json").read_text())
    summary["stage_digests"] = ["0" * 64]
    (moved / "summary.json").write_text(json.dumps(summary))
    before = files(moved)
    line = refused(*staged(tmp_path / "b2", data, f"branch_from={moved}"))
    step = max(int(p.name) for p in (moved / "checkpoints").iterdir() if p.name.isdigit())
    assert line.startswith(f"error: branch_from: {moved}: checkpoint {moved}/checkpoints/{step} is not the end of "
                           "stage A its summary.json records (weights digest ")
    assert line.endswith(", recorded 000000000000); was its checkpoint dir replaced or shared with another run? "
                         "Branch from an intact run")
    assert files(moved) == before
    # A damaged summary: one line naming it and what to do.
    (moved / "summary.json").write_text(json.dumps(summary)[:40])
    line = refused(*staged(tmp_path / "b3", data, f"branch_from={moved}"))
    assert line.startswith(f"error: {moved}/summary.json: damaged, not JSON (")
    assert line.endswith("); branch from an intact run, or rerun that one to its end")


def test_a_damaged_study_record_is_one_line(tmp_path):
    (tmp_path / "base.yaml").write_text((ROOT / "configs/tasks/seq_cls.yaml").read_text())
    study = tmp_path / "study.yaml"
    study.write_text("base: base.yaml\nseeds: 1\nmethods:\n  naive: []\n")
    from tenure.engine.study.config import load_study, plan_runs
    run, = plan_runs(load_study(study), study, tmp_path / "out")
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "study_run.json").write_text('{"method": "na')
    line = refused("study", study, "--out", tmp_path / "out")
    assert line == (f"error: {run.run_dir}/study_run.json: damaged, not JSON (Unterminated string starting at: "
                    f"line 1 column 12 (char 11)); remove {run.run_dir} (its run starts over) or choose another --out")


def test_a_full_disk_at_the_first_save_is_one_line(data, tmp_path):  # noqa: F811
    """Orbax closes its event loop after the failed write while tensorstore completes the step's
    other writes: their callbacks' "Event loop is closed" tracebacks are not printed."""
    with mounted_tmpfs(tmp_path / "small", size="100k") as small:
        line = refused(*args(tmp_path / "run", data, 2, f"checkpoint.dir={small / 'ckpts'}",
                             "checkpoint.every_steps=2"))
    assert line.startswith(f"error: checkpoint save to {small / 'ckpts'} failed: ")
    assert "No space left on device" in line


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path):
    """A summary rewritten on a full disk: the old one stays whole, no temporary file is left."""
    from tenure.engine.runtime import atomic
    with mounted_tmpfs(tmp_path / "small", size="64k") as small:
        atomic.write_text(small / "summary.json", '{"old": 1}')
        with pytest.raises(OSError):
            atomic.write_text(small / "summary.json", "x" * 200_000)
        assert [p.name for p in small.iterdir()] == ["summary.json"]
        assert (small / "summary.json").read_text() == '{"old": 1}'


def test_a_nan_in_a_checkpoint_is_named_at_restore(finished, data, tmp_path):  # noqa: F811
    """A checkpoint damaged on disk after it was saved (saves refuse non-finite states): one
    embedding row turns NaN. `tenure eval` names the array instead of scoring NaN."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from tenure.engine.runtime.checkpoint import Checkpointer, DataStateSave
    run_dir, ckpt_dir = finished
    damaged = pathlib.Path(shutil.copytree(ckpt_dir, tmp_path / "ckpts"))
    ckpt = Checkpointer(None, damaged)
    step = ckpt.latest_step()
    saved = ckpt._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                extra=ocp.args.JsonRestore()))
    data_state = ckpt._read_data_state(step)
    state = jax.tree.map(np.array, saved["state"])
    (path, row), = [(p, leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]
                    if "word_embeddings" in jax.tree_util.keystr(p)]
    row[-1, 0] = np.nan  # the last vocabulary row: no batch reaches it
    ckpt._manager.delete(step)
    ckpt._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     extra=ocp.args.JsonSave(saved["extra"]),
                                                     data=DataStateSave(data_state)), force=True)
    ckpt.close()
    line = refused("eval", *args(run_dir, data, 2, f"checkpoint.dir={damaged}")[1:], "--checkpoint", damaged)
    assert line.startswith(f"error: checkpoint {damaged}/{step}: non-finite values (NaN or Inf) in 1 array (first: "
                           "params/backbone/embeddings/word_embeddings/embedding); it is damaged: ")
