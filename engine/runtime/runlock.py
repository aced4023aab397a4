"""One run per run directory: a lock file the training process holds for its whole life.

    with RunLock(run_dir, process_index=jax.process_index()):
        ...train...

The lock is `fcntl.flock` on `<run_dir>/.tenure-lock` (one file per JAX process index, so
the processes of one multi-host run do not collide while a second run's processes do);
the file names its holder (pid, host, start time) for the one-line refusal. The kernel
drops a flock when its process dies, so a lock left by a killed run (kill -9, OOM, a
node reboot) is taken over, with a note naming the dead holder. On filesystems without
flock the holder's pid is checked instead (same host only).

Creating the lock is the run's first write into the run directory, so an unwritable or
read-only run directory is reported here, as one line naming it and the cause.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable

from tenure.models.errors import TenureError

LOCK_NAME = ".tenure-lock"


def lock_path(run_dir: str | os.PathLike, process_index: int = 0) -> Path:
    suffix = "" if process_index == 0 else f".process_{process_index}"
    return Path(run_dir) / f"{LOCK_NAME}{suffix}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (the lock file names none)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(started {holder.get('started', '?')})")


class RunLock:
    """Context manager; `took_over` is the dead holder's info when a stale lock was replaced."""

    def __init__(self, run_dir: str | os.PathLike, process_index: int = 0,
                 log: Callable[[str], None] = print, what: str = "run_dir"):
        """`what` names the directory in messages: "run_dir", or "checkpoint.dir" for a checkpoint
        directory outside the run dir (it belongs to one run, so it is locked too)."""
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir, process_index)
        self.log = log
        self.what = what
        self.took_over: dict | None = None
        self._fd: int | None = None

    def _io_error(self, error: OSError, what: str) -> TenureError:
        cause = error.strerror or os.strerror(error.errno or 0)
        return TenureError(f"{self.what} {self.run_dir}: cannot {what}: {cause}")

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise TenureError(f"{self.what} {self.run_dir}: exists and is not a directory")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._io_error(error, "create it") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise self._io_error(error, f"write the lock file {self.path.name}") from None
        holder = _read_holder(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TenureError(f"{self.what} {self.run_dir} is in use by {_describe(holder)}; wait for "
                              f"that run to finish, stop it, or use another {self.what}") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise self._io_error(error, "lock it") from None
            self._check_pid(holder, fd)  # no flock on this filesystem: judge by the pid
        if holder and holder.get("pid") is not None:
            self.took_over = holder
            self.log(f"note: {self.what} {self.run_dir}: taking over the lock of {_describe(holder)}, "
                     "which is no longer running")
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            raise self._io_error(error, f"write the lock file {self.path.name}") from None
        self._fd = fd
        return self

    def _check_pid(self, holder: dict, fd: int) -> None:
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if pid is not None and pid != os.getpid() and (not same_host or _pid_alive(int(pid))):
            os.close(fd)
            where = "" if same_host else f"; if it is gone, delete {self.path}"
            raise TenureError(f"{self.what} {self.run_dir} is in use by {_describe(holder)}{where}")

    def release(self) -> None:
        """Empties the lock file and drops the lock; the file stays (unlinking a flocked file
        races with a waiting process that opened the old inode)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether `path` is `directory` or lies under it (both made absolute, symlinks resolved)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def set_aside_run(run_dir: str | os.PathLike, what: str = "run_dir") -> Path | None:
    """`--restart`: moves everything in `run_dir` except the lock files into a new sibling
    directory `<run_dir>.old-<UTC time>` (renames on one filesystem: nothing is copied or
    deleted) and returns it; None when there was nothing to move. Call it while holding
    the RunLock (primary process only), before anything of the new run is written. A run dir
    that holds the current directory is refused: everything in it would move."""
    run_dir = Path(run_dir).absolute()
    if is_inside(Path.cwd(), run_dir):
        raise TenureError(f"--restart: {what} {run_dir} is the current directory or holds it, so everything "
                          f"in it would be moved aside; give the run a {what} of its own")
    entries = [e for e in run_dir.iterdir() if not e.name.startswith(LOCK_NAME)] if run_dir.is_dir() else []
    if not entries:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    try:
        aside.mkdir()
        for entry in entries:
            entry.rename(aside / entry.name)
    except OSError as error:
        raise TenureError(f"{what} {run_dir}: cannot move the old run aside to {aside}: "
                          f"{error.strerror or error}") from None
    return aside
