"""One run per run dir: a second process is refused naming the holder; a killed holder's
lock is taken over; an unwritable run dir is one line. Real processes, real flock."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tenure.engine.runtime.runlock import RunLock, lock_path
from tenure.models.errors import TenureError
from tests.fs_helpers import mounted_tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = textwrap.dedent("""
    import sys, time
    from tenure.engine.runtime.runlock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_naming_the_holder(tmp_path):
    holder = start_holder(tmp_path / "run")
    try:
        with pytest.raises(TenureError) as err:
            RunLock(tmp_path / "run").acquire()
        info = json.loads(lock_path(tmp_path / "run").read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert str(err.value) == (
            f"run_dir {tmp_path / 'run'} is in use by pid {holder.pid} on host {socket.gethostname()} "
            f"(started {info['started']}); wait for that run to finish, stop it, or use another run_dir")
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    notes = []
    with RunLock(tmp_path, log=notes.append) as lock:
        assert lock.took_over["pid"] == holder.pid
        assert json.loads(lock_path(tmp_path).read_text())["pid"] == os.getpid()
    assert notes == [f"note: run_dir {tmp_path}: taking over the lock of pid {holder.pid} on host "
                     f"{socket.gethostname()} (started {lock.took_over['started']}), which is no longer running"]
    # A clean release leaves an empty lock file: the next run takes it without a note.
    assert lock_path(tmp_path).read_text() == ""
    with RunLock(tmp_path, log=notes.append) as again:
        assert again.took_over is None and len(notes) == 1


def test_processes_of_one_run_use_their_own_lock_files(tmp_path):
    with RunLock(tmp_path, process_index=0), RunLock(tmp_path, process_index=1):
        assert lock_path(tmp_path, 1).name == ".tenure-lock.process_1"


def test_unwritable_run_dir_is_one_line(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(TenureError, match=f"^run_dir {ro}/run: cannot create it: Read-only file system$"):
            RunLock(ro / "run").acquire()
        with pytest.raises(TenureError, match=f"^run_dir {ro}: cannot write the lock file .tenure-lock: "
                                              "Read-only file system$"):
            RunLock(ro).acquire()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TenureError, match=f"^run_dir {tmp_path}/file: exists and is not a directory$"):
        RunLock(tmp_path / "file").acquire()


def test_restart_moves_the_old_run_aside(tmp_path):
    from tenure.engine.runtime.runlock import set_aside_run
    run = tmp_path / "run"
    with RunLock(run):
        assert set_aside_run(run) is None  # only the lock file: nothing to move
        (run / "checkpoints" / "4").mkdir(parents=True)
        (run / "summary.json").write_text("{}")
        aside = set_aside_run(run)
        assert aside.parent == tmp_path and aside.name.startswith("run.old-")
        assert sorted(os.listdir(aside)) == ["checkpoints", "summary.json"]
        assert os.listdir(run) == [".tenure-lock"]
        (run / "summary.json").write_text("{}")
        assert set_aside_run(run) != aside  # a second restart in the same second gets its own
