"""Run safety, second round (issue 25), through the real CLI on the tiny BERT fixture: no run is
lost to another run or to a rerun, and each refusal is one line, exit code 2, with every file
of the earlier run unchanged (byte comparison). One tiny finished run, with its checkpoint dir
outside the run dir, is shared by the tests that need one."""
import pathlib

import pytest

from test_run_safety import args
from test_train_loop import data  # noqa: F401  (the `data` fixture)
from tests.cli_helpers import tenure

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
                    f"{run_dir}/hf) and train.resume=false would overwrite it: add --restart to move it aside "
                    "first, or --overwrite to replace it in place")
    assert files(run_dir, ckpt_dir) == before


def test_restart_moves_an_outside_checkpoint_dir_aside_too(finished, data, tmp_path):  # noqa: F811
    """--restart with a changed lr starts over (no resume, no drift refusal) and the old run's
    files, checkpoints included, are kept byte for byte next to where they were."""
    src_run, src_ckpt = finished
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpts"  # a copy: the shared run stays as it is
    import shutil
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


@pytest.mark.parametrize("run_dir", [".", ""])
def test_restart_of_the_current_directory_is_one_line(run_dir, data):  # noqa: F811
    line = refused(*args(run_dir, data, 2, "--restart"))
    if run_dir:
        assert line == (f"error: --restart: run_dir {ROOT} is the current directory or holds it, so everything "
                        "in it would be moved aside; give the run a run_dir of its own")
    else:
        assert line == ("error: configs/quickstart.yaml: config key 'run_dir': String should have at least "
                        "1 character (got '')")
