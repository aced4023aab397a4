"""Length-grouped batches: less padding without changing what is computed per example.

Training (`LengthGroupIterDataset`): the shuffled example stream is cut into windows of
`window` batches; each window is sorted by length (stable), cut into batches of `rows`, and
those batches are put in a seeded random order. A batch then pads to the smallest length bucket
that holds examples of similar length. The examples seen, their order within an epoch up to
the window, and every per-example loss are unchanged; only who shares a batch changes. A
window cut short by the end of the data keeps its one partial batch last (it is dropped by
the batcher, as without grouping).

Resume: the state is the parent's state at the window's start, the window's index and the
position in it; restoring re-reads that window (deterministic), so a resumed run sees the
same batches.

Evaluation (`length_order`): the examples of a split in order of length, for the same reason.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np


def example_length(example: dict) -> int:
    """The padded width an example needs: its longest token sequence (query, passages, text)."""
    return max(int(v.shape[-1]) for k, v in example.items() if k.endswith("input_ids"))


class _GroupIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, rows: int, window: int, seed: int):
        super().__init__(parent)
        self._source, self._rows, self._window_size, self._seed = parent, rows, window, seed
        self._window_start = parent.get_state()
        self._window, self._buffer, self._pos = 0, [], 0

    def _fill(self) -> None:
        self._window_start = self._source.get_state()
        examples = []
        for _ in range(self._rows * self._window_size):
            try:
                examples.append(next(self._source))
            except StopIteration:
                break
        order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
        batches = [order[i:i + self._rows] for i in range(0, len(order), self._rows)]
        full = len(order) // self._rows
        shuffled = [batches[i] for i in np.random.default_rng([self._seed, self._window]).permutation(full)]
        self._buffer = [examples[i] for batch in shuffled + batches[full:] for i in batch]

    def __next__(self) -> Any:
        if self._pos >= len(self._buffer):
            if self._buffer:
                self._window += 1
            self._fill()
            self._pos = 0
            if not self._buffer:
                raise StopIteration
        example = self._buffer[self._pos]
        self._pos += 1
        return example

    def get_state(self) -> dict:
        return {"parent": self._window_start, "window": self._window, "pos": self._pos}

    def set_state(self, state: dict) -> None:
        self._source.set_state(state["parent"])
        self._window, self._buffer, self._pos = state["window"], [], 0
        self._window_start = state["parent"]
        if state["pos"]:
            self._fill()
            self._pos = state["pos"]


class LengthGroupIterDataset(grain.IterDataset):
    """Examples regrouped so that each run of `rows` holds examples of similar length."""

    def __init__(self, parent: grain.IterDataset, *, rows: int, window: int, seed: int):
        super().__init__(parent)
        self._rows, self._window, self._seed = rows, window, seed

    def __iter__(self) -> _GroupIterator:
        return _GroupIterator(self._parents[0].__iter__(), self._rows, self._window, self._seed)

    def __str__(self) -> str:
        return f"LengthGroupIterDataset(rows={self._rows}, window={self._window})"


def length_order(lengths) -> np.ndarray:
    """Indices of the examples by length (stable: equal lengths keep their order)."""
    return np.argsort(np.asarray(lengths), kind="stable")
