"""Real small or read-only filesystems for I/O-failure tests (a tmpfs mount needs root).

`mounted_tmpfs(path, size="256k", read_only=False)` mounts a fresh tmpfs at `path` and
unmounts it afterwards; where mounting is not permitted the test is skipped (not faked).
"""
import contextlib
import os
import subprocess

import pytest


@contextlib.contextmanager
def mounted_tmpfs(path, size: str = "256k", read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
