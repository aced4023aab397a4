"""Random-access readers for JSONL, CSV/TSV, Parquet and ArrayRecord files as grain datasets.

Every element is ``(location, raw)``: ``location`` names where the record came from, so a
bad record can be reported as ``data/train.jsonl:17: ...``; ``raw`` is the record as a
dict. JSONL and CSV are read through a byte-offset index built once per file and cached
beside it (``.train.jsonl.tenure-idx``), so a record is one ``pread`` and nothing is
loaded into memory whole.
"""

import bisect
import csv
import glob
import hashlib
import io
import json
import os
import threading
import uuid
import zipfile
from collections.abc import Sequence

import grain
import numpy as np
import pyarrow.parquet as pq
from array_record.python.array_record_data_source import ArrayRecordDataSource

from tenure.models.errors import TenureError

# A line that is not valid JSON (or a CSV row with the wrong column count) becomes
# ``{BAD_RAW_KEY: reason}``; records.parse_record turns it into a BadRecord, so
# ``on_bad_record: skip`` can skip it like any other bad record.
BAD_RAW_KEY = "__tenure_unparseable__"

FORMATS = ("jsonl", "csv", "tsv", "parquet", "arrayrecord")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
    ".parquet": "parquet", ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord",
}
_INDEX_SUFFIX = ".tenure-idx"


def open_source(paths: str | list[str], fmt: str | None = None) -> grain.MapDataset:
    """Open one or many local files (paths or globs) as one random-access dataset.

    Args:
      paths: a path, a glob, or a list of them. Matches are de-duplicated and read in
        sorted order, concatenated.
      fmt: one of ``FORMATS``; ``None`` picks each file's format from its extension
        (``.jsonl``/``.json`` = JSON lines, ``.csv``, ``.tsv``, ``.parquet``,
        ``.arrayrecord``/``.array_record``).

    Returns:
      A ``grain.MapDataset`` of ``(location, raw_dict)``. Locations are
      ``file:LINE`` (1-based) for JSONL and CSV/TSV (the line where the row starts),
      ``file:row N`` for Parquet and ``file:record N`` for ArrayRecord (N counts from 0,
      as pyarrow and array_record index). Blank JSONL lines are not records.

    Raises:
      TenureError: naming the path, if a glob matches nothing, a file is missing or
        unreadable, the format is unknown, or a Parquet/ArrayRecord file cannot be opened.
    """
    files = resolve_paths(paths)
    readers = [_open_file(path, fmt or _format_of(path)) for path in files]
    return grain.MapDataset.source(_Concat(readers))


def resolve_paths(paths: str | list[str]) -> list[str]:
    """Expand globs into a sorted, de-duplicated list of readable files (TenureError otherwise)."""
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not patterns:
        raise TenureError("data: no input paths given")
    files = set()
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise TenureError(f"{pattern}: no file matches this pattern")
            files.update(matches)
        elif not os.path.exists(pattern):
            raise TenureError(f"{pattern}: no such file")
        elif not os.path.isfile(pattern):
            raise TenureError(f"{pattern}: not a regular file")
        else:
            files.add(pattern)
    for path in files:
        if not os.access(path, os.R_OK):
            raise TenureError(f"{path}: file is not readable (permission denied)")
    return sorted(files)


def files_digest(paths: str | list[str]) -> str:
    """sha256 over the files `paths` names (their names and bytes, in resolve_paths' order): what a
    resume compares to know its training data is the one the checkpoint's data position counts in."""
    digest = hashlib.sha256()
    for path in resolve_paths(paths):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def select(ds: Sequence, indices: np.ndarray) -> grain.MapDataset:
    """A MapDataset of ``ds[indices[i]]``: keeps a filtered view without copying records."""
    return grain.MapDataset.source(_Select(ds, np.asarray(indices, dtype=np.int64)))


def _format_of(path: str) -> str:
    for extension, fmt in _EXTENSIONS.items():
        if path.lower().endswith(extension):
            return fmt
    raise TenureError(f"{path}: unknown file type; name it .jsonl/.csv/.tsv/.parquet/"
                      ".arrayrecord or set the data format explicitly")


def _open_file(path: str, fmt: str):
    if fmt == "jsonl":
        return _JsonlFile(path)
    if fmt in ("csv", "tsv"):
        return _CsvFile(path, delimiter="," if fmt == "csv" else "\t")
    if fmt == "parquet":
        return _ParquetFile(path)
    if fmt == "arrayrecord":
        return _ArrayRecordFile(path)
    raise TenureError(f"{path}: unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


# ---- line-offset index, cached beside the file --------------------------------------------

def index_path(path: str) -> str:
    """Where the cached offset index of ``path`` lives: a hidden sibling file."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{_INDEX_SUFFIX}")


def _load_or_build_index(path: str, kind: str, build) -> np.ndarray:
    """Return the ``[n, 2]`` int64 (byte offset, 1-based line) index of ``path``.

    The cache stores the index kind (JSONL lines or CSV rows with a delimiter) and the
    file's size and mtime; any change rebuilds it. A read-only
    directory just means the index lives in memory for this run.
    """
    stat = os.stat(path)
    cached = index_path(path)
    try:
        with np.load(cached, allow_pickle=False) as saved:
            if (str(saved["kind"]) == kind and int(saved["size"]) == stat.st_size
                    and int(saved["mtime_ns"]) == stat.st_mtime_ns):
                return saved["index"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing, stale or corrupt: rebuild
    index = build(path)
    tmp = f"{cached}.{uuid.uuid4().hex}.tmp"  # processes on several hosts may race here
    try:
        with open(tmp, "wb") as out:
            np.savez(out, index=index, kind=kind, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        os.replace(tmp, cached)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
    return index


def _jsonl_index(path: str) -> np.ndarray:
    rows, offset = [], 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                rows.append((offset, line_number))
            offset += len(line)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


class _IndexedFile:
    """A text file read by ``os.pread`` between indexed offsets (thread-safe, picklable)."""

    def __init__(self, path: str, index: np.ndarray):
        self.path = path
        self._index = index
        self._size = os.path.getsize(path)
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._index)

    def _read_bytes(self, i: int) -> bytes:
        start = int(self._index[i, 0])
        end = int(self._index[i + 1, 0]) if i + 1 < len(self._index) else self._size
        return os.pread(self._fd, end - start, start)

    def _location(self, i: int) -> str:
        return f"{self.path}:{int(self._index[i, 1])}"

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _fd=os.open(state["path"], os.O_RDONLY))

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class _JsonlFile(_IndexedFile):
    def __init__(self, path: str):
        super().__init__(path, _load_or_build_index(path, "jsonl", _jsonl_index))

    def __getitem__(self, i: int) -> tuple[str, dict]:
        line = self._read_bytes(i).split(b"\n", 1)[0]
        try:
            raw = json.loads(line)
        except UnicodeDecodeError as error:
            raw = {BAD_RAW_KEY: f"not UTF-8 text ({error.reason})"}
        except json.JSONDecodeError as error:
            raw = {BAD_RAW_KEY: f"invalid JSON: {error.msg} at column {error.colno}"}
        return self._location(i), raw


def _dialect(delimiter: str) -> dict:
    """csv.reader arguments: CSV quotes (a quoted cell may hold commas and newlines); TSV has no
    quoting, so a cell that starts with a quotation mark is text (quoted, it ran on over tabs and
    lines to the next quotation mark, merging rows)."""
    return {"delimiter": delimiter} if delimiter == "," else {"delimiter": delimiter, "quoting": csv.QUOTE_NONE}


def _csv_index(delimiter: str):
    """Index builder for CSV rows, which may span lines inside quotes; row 0 is the header."""

    def build(path: str) -> np.ndarray:
        line_starts: list[tuple[int, int]] = []

        def lines():
            offset = 0
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, start=1):
                    line_starts.append((offset, line_number))
                    offset += len(line)
                    yield line.decode("utf-8-sig" if line_number == 1 else "utf-8")

        rows, reader = [], csv.reader(lines(), **_dialect(delimiter))
        while True:
            consumed = len(line_starts)
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as error:
                raise TenureError(f"{path}:{consumed + 1}: cannot parse CSV ({error})") from None
            if row:
                rows.append(line_starts[consumed])
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    return build


class _CsvFile(_IndexedFile):
    def __init__(self, path: str, delimiter: str):
        self._delimiter = delimiter
        # the TSV index's name changed with its quoting: an index built with quotes is not reused
        index = _load_or_build_index(path, "csv," if delimiter == "," else "tsv-unquoted", _csv_index(delimiter))
        super().__init__(path, index[1:])
        if len(index):
            with open(path, encoding="utf-8-sig", newline="") as f:
                self._header = next(csv.reader(f, **_dialect(delimiter)))
        else:
            self._header = []
        twice = sorted({name for name in self._header if self._header.count(name) > 1})
        if twice:  # the record would keep the last such column's value
            raise TenureError(f"{path}:1: column{'s' * (len(twice) > 1)} {', '.join(map(repr, twice))} appear"
                              f"{'s' * (len(twice) == 1)} twice in the header")

    def __getitem__(self, i: int) -> tuple[str, dict]:
        text = self._read_bytes(i).decode("utf-8")
        row = next(csv.reader(io.StringIO(text, newline=""), **_dialect(self._delimiter)))
        if len(row) != len(self._header):
            raw = {BAD_RAW_KEY: f"row has {len(row)} columns, header has {len(self._header)}"}
        else:
            raw = dict(zip(self._header, row))
        return self._location(i), raw


class _ParquetFile:
    """Parquet rows read one row group at a time; the last group read stays cached.

    Shuffled access over a large file decodes a row group per record: convert such data
    to ArrayRecord (true per-record random access).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise TenureError(f"{path}: cannot read Parquet file ({error})") from None
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        self._group_starts = np.cumsum([0, *sizes]).tolist()
        self._lock = threading.Lock()
        self._cached_group, self._cached_table = -1, None
        self._file = None

    def __len__(self) -> int:
        return self._group_starts[-1]

    def __getitem__(self, i: int) -> tuple[str, dict]:
        group = bisect.bisect_right(self._group_starts, i) - 1
        with self._lock:
            if group != self._cached_group:
                if self._file is None:
                    self._file = pq.ParquetFile(self.path)
                self._cached_table = self._file.read_row_group(group)
                self._cached_group = group
            table = self._cached_table
        raw = table.slice(i - self._group_starts[group], 1).to_pylist()[0]
        return f"{self.path}:row {i}", raw

    def __getstate__(self):
        state = {**self.__dict__, "_file": None, "_cached_group": -1, "_cached_table": None}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


class _ArrayRecordFile:
    """ArrayRecord records, each a UTF-8 JSON object."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._source = ArrayRecordDataSource([path])
        except Exception as error:  # array_record raises a bare RuntimeError/ValueError
            raise TenureError(f"{path}: cannot read ArrayRecord file ({error})") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[str, dict]:
        try:
            raw = json.loads(self._source[i].decode("utf-8"))
        except UnicodeDecodeError as error:
            raw = {BAD_RAW_KEY: f"not UTF-8 text ({error.reason})"}
        except json.JSONDecodeError as error:
            raw = {BAD_RAW_KEY: f"invalid JSON: {error.msg} at column {error.colno}"}
        return f"{self.path}:record {i}", raw


class _Concat(Sequence):
    """Several files as one sequence, in the given order."""

    def __init__(self, files: list):
        self._files = files
        self._starts = np.cumsum([0, *map(len, files)]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        f = bisect.bisect_right(self._starts, i) - 1
        return self._files[f][i - self._starts[f]]


class _Select(Sequence):
    def __init__(self, base: Sequence, indices: np.ndarray):
        self._base = base
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int):
        return self._base[int(self._indices[i])]
