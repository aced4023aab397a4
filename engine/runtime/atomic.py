"""Files a later command reads back (summaries, forgetting records, study records) are written
atomically: into a temporary file beside the target, flushed to disk, then renamed over it, so
a kill or a full disk leaves the old file or the new one, never half of one. Reading one back
that is damaged anyway (edited, truncated by hand) is one line naming it and what to do."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tenure.models.errors import TenureError


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON in `path`; a TenureError naming it, the cause and `fix` when it is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise TenureError(f"{path}: cannot read ({error.strerror or error}); {fix}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise TenureError(f"{path}: damaged, not JSON ({error}); {fix}") from None
