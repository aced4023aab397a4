"""Fixed-shape rows from variable-length examples: padding into batches, and LM packing.

Padding (`collate`): a batch is padded to the smallest length bucket that holds its longest
example, so a few shapes cover every batch (few recompiles). `input_ids` pad with the pad
id, `labels` with -100, every other array with 0; padding rows get `example_mask` 0.

Packing (`pack_examples`, `PackIterDataset`): greedy next-fit. Examples are appended to the
current row in stream order; when the next example does not fit, the row is closed (padded)
and a new row starts with it. Order is kept, so the stream (and its resume state) stays
simple; the cost is some padding at row ends. Each packed example gets `segment_ids`
1..n (0 = pad) and `positions` restarting at 0. Scalar fields of the examples (`task_id` in a
staged run) become fields of the row; a row holds only examples with equal scalar fields (one
whose differ closes the row), so a packed row never mixes tasks.

Labels never cross examples: labels follow the HF convention (aligned with `input_ids`, the
loss shifts, so the logits at token t are scored against `labels[t + 1]`). We set the label
of the FIRST token of every segment to -100. The last token of segment k is then scored
against -100, i.e. it never predicts segment k+1's first token; and since the label at a
segment's first position is never a target in an unpacked row either, the packed loss
equals the sum of the unpacked losses exactly.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from tenure.engine.data.batch_spec import IGNORE

LM_KEYS = ("input_ids", "attention_mask", "labels")


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (buckets sorted ascending; the last is max_length)."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _group(key: str) -> str:
    return key.split("_", 1)[0] if key.startswith(("query_", "passage_")) else "main"


def collate(examples: Sequence[dict[str, np.ndarray]], buckets: Sequence[int], *, pad_id: int = 0,
            rows: int | None = None) -> dict[str, np.ndarray]:
    """Stack examples into a batch of `rows` rows (default len(examples)), padding sequences
    (last axis) to a bucket per group (main / query_ / passage_) and adding `example_mask`."""
    rows = len(examples) if rows is None else rows
    first = examples[0]
    widths: dict[str, int] = {}
    for key, value in first.items():
        if value.ndim:
            longest = max(ex[key].shape[-1] for ex in examples)
            widths[_group(key)] = max(widths.get(_group(key), 0), longest)
    batch = {}
    for key, value in first.items():
        fill = IGNORE if key == "labels" and value.ndim else pad_id if key.endswith("input_ids") else 0
        if value.ndim == 0:
            out = np.zeros((rows,), value.dtype)
        else:
            width = bucket_length(widths[_group(key)], buckets)
            out = np.full((rows,) + value.shape[:-1] + (width,), fill, value.dtype)
        for r, ex in enumerate(examples):
            v = ex[key]
            if v.ndim == 0:
                out[r] = v
            else:
                out[(r,) + tuple(slice(0, n) for n in v.shape)] = v
        batch[key] = out
    mask = np.zeros((rows,), np.float32)
    mask[: len(examples)] = 1.0
    batch["example_mask"] = mask
    return batch


def _empty_row(length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((length,), pad_id, np.int32), "attention_mask": np.zeros((length,), np.int32),
            "labels": np.full((length,), IGNORE, np.int32), "segment_ids": np.zeros((length,), np.int32),
            "positions": np.zeros((length,), np.int32)}


def _scalars(example: dict) -> dict[str, int]:
    return {k: int(v) for k, v in example.items() if np.ndim(v) == 0}


def _fits(row_scalars: dict[str, int] | None, used: int, example: dict, row_length: int) -> bool:
    """Whether `example` joins the open row: room left and the same scalar fields (task)."""
    return used + len(example["input_ids"]) <= row_length and _scalars(example) == row_scalars


def _place(row: dict[str, np.ndarray], start: int, segment: int, example: dict) -> int:
    n = len(example["input_ids"])
    for key, value in _scalars(example).items():
        row[key] = np.asarray(value, np.int32)
    stop = start + n
    row["input_ids"][start:stop] = example["input_ids"]
    row["attention_mask"][start:stop] = 1
    row["labels"][start:stop] = example["labels"]
    row["labels"][start] = IGNORE  # the previous segment's last token must not predict this one
    row["segment_ids"][start:stop] = segment
    row["positions"][start:stop] = np.arange(n)
    return stop


def pack_examples(examples: Sequence[dict], row_length: int, *, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Greedy next-fit packing of a list of LM examples (each at most row_length tokens)."""
    rows, row, used, segment = [], None, 0, 0
    for ex in examples:
        if row is None or not _fits(_scalars(row), used, ex, row_length):
            if row is not None:
                rows.append(row)
            row, used, segment = _empty_row(row_length, pad_id), 0, 0
        segment += 1
        used = _place(row, used, segment, ex)
    if row is not None:
        rows.append(row)
    return rows


class _PackIterator(grain.DatasetIterator):
    """State = parent state + the example already pulled that did not fit the last row."""

    def __init__(self, parent: grain.DatasetIterator, row_length: int, pad_id: int):
        super().__init__(parent)
        self._row_length, self._pad_id = row_length, pad_id
        self._pending: dict | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        row, used, segment = _empty_row(self._row_length, self._pad_id), 0, 0
        while True:
            example = self._pending
            self._pending = None
            if example is None:
                try:
                    example = next(self._parent)
                except StopIteration:
                    if segment:
                        return row
                    raise
            if segment and not _fits(_scalars(row), used, example, self._row_length):
                self._pending = example
                return row
            segment += 1
            used = _place(row, used, segment, example)

    def get_state(self) -> dict:
        pending = None if self._pending is None else {k: np.asarray(v).tolist() for k, v in self._pending.items()
                                                      if k in LM_KEYS or np.ndim(v) == 0}
        return {"parent": self._parent.get_state(), "pending": pending}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        pending = state["pending"]
        self._pending = None if pending is None else {k: np.asarray(v, np.int32) for k, v in pending.items()}


class PackIterDataset(grain.IterDataset):
    """Packs a stream of LM examples into rows of `row_length` tokens (see module doc)."""

    def __init__(self, parent: grain.IterDataset, row_length: int, *, pad_id: int = 0):
        super().__init__(parent)
        self._row_length, self._pad_id = row_length, pad_id

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._row_length, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(row_length={self._row_length})"
