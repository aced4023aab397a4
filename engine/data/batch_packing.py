"""Packing within a batch: for kinds with one output per example (seq_cls, pair_cls, regression,
`pack_batch`) and for sft, whose labels are per token (`pack_rows`).

A packed batch holds exactly the examples the unpacked pipeline puts in that batch, in the same
stream order (so steps, the lr schedule and the iterator's resume state mean the same thing);
only their layout changes: they are placed into R rows of `row_length` tokens, first-fit
decreasing by length, and R is padded up to a multiple of a step (about an eighth of the
examples, rounded up to a multiple of `shards`) and to at least `min_rows` per micro-batch.
A run's training batches set `min_rows` to what 99% of them need (`planned_rows`, from batches
drawn from its data), so the train step compiles for one or two row counts, where each count its
batches happened to need (up to 8) compiled a step of its own. Eval batches take the rows they
need. Padding rows are all pad.

Per-token arrays [R, row_length]: input_ids (pad_id), attention_mask, token_type_ids (pairs),
segment_ids (1..k within a row, 0 = pad) and positions (0.. within each segment).
Per-example arrays [n]: labels and the other scalars (task_id), example_mask, and
example_row / example_start (int32): the row and the position of the example's first token
([CLS]). Padding examples (example_mask 0) point at row 0, position 0.

The encoder reads segment_ids (block-diagonal attention) and positions (per-segment position
ids), as for packed causal-LM rows; the head pools each example at (example_row, example_start)
or over its own segment (tenure.models.heads.pool), so the logits are [n, C] as unpacked.

Layout constraints, both exact:
- `accum` (optim.grad_accum_steps = k): tenure.engine.train.step splits every array into micro-batches by
  index modulo k (rows i*k+j go to micro-batch j). So the examples of micro-batch j (index % k ==
  j) are packed into rows r with r % k == j, Q rows per micro-batch (R = k * Q); the step divides
  example_row by k.
- `shards` (data x fsdp shards of this process's rows): Q is a multiple of it, so every device
  holds whole rows of every micro-batch.
Several processes must agree on the global shape without exchanging row counts every step (as
`process_buckets` does for widths): they set `min_rows` to the examples per micro-batch, so R
= n and packing saves nothing. example_row is a row of this process's batch; `to_global_batch`
turns it into a row of the global batch.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tenure.engine.data.batch_spec import IGNORE
from tenure.models.errors import TenureError


def row_step(examples: int, shards: int = 1) -> int:
    """Row counts of a micro-batch of `examples` are multiples of this: ceil(examples / 8),
    rounded up to a multiple of `shards`."""
    step = max(1, math.ceil(examples / 8))
    return math.ceil(step / shards) * shards


def planned_rows(length_pools: Sequence[Sequence[int]], weights: Sequence[float], *, examples: int,
                 row_length: int, shards: int = 1, separate: bool = False, cover: float = 0.99,
                 draws: int = 1000, seed: int = 0) -> int:
    """Rows per micro-batch of `examples` that a run's packed batches use at least: enough for
    `cover` of `draws` batches drawn from the example lengths in `length_pools` (one pool per
    source, picked by `weights`; `separate`: examples of different pools never share a row, as
    `pack_rows` keeps tasks apart). Every row count compiles the step anew, and a batch needing
    more than the plan gets one of its own: at 0.99 a run compiles one or two row counts, where
    each count its batches happened to need (up to 8) compiled before, for a few padding rows."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(weights, float) / np.sum(weights)
    capped = [np.minimum(np.asarray(pool), row_length) for pool in length_pools]
    needed = []
    for _ in range(draws):
        picks = rng.choice(len(capped), size=examples, p=weights)
        groups = [capped[k][rng.integers(len(capped[k]), size=int(np.sum(picks == k)))] for k in range(len(capped))]
        if not separate:
            groups = [np.concatenate(groups)]
        needed.append(sum(len(first_fit_decreasing(group.tolist(), row_length)) for group in groups if len(group)))
    step = row_step(examples, shards)
    rows = int(np.sort(needed)[math.ceil(cover * draws) - 1])
    return min(math.ceil(rows / step) * step, math.ceil(examples / step) * step)


def first_fit_decreasing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Bins of indices (each bin's lengths sum to <= row_length), longest example first; every bin
    lists its indices in ascending order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > row_length:
            raise TenureError(f"data.pack: an example of {lengths[i]} tokens does not fit a row of "
                              f"data.max_length={row_length}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_length - lengths[i])
    return [sorted(row) for row in rows]


def _layout(examples, *, row_length: int, slots: int | None, real: int | None, accum: int, shards: int,
            min_rows: int, key=lambda e: None):
    """(slots, real, lengths, rows per micro-batch j: lists of example indices, the row count).
    Micro-batch j's examples (index % accum == j) fill rows r % accum == j; examples whose `key`
    differs never share a row."""
    slots = len(examples) if slots is None else slots
    real = len(examples) if real is None else real
    if slots % accum:
        raise TenureError(f"data.pack: the {slots} examples of a process's batch do not split into "
                          f"optim.grad_accum_steps={accum} micro-batches")
    per_micro = slots // accum
    step = row_step(per_micro, shards)
    most = math.ceil(per_micro / step) * step
    lengths = [len(ex["input_ids"]) for ex in examples[:real]]
    micro_rows = []
    for j in range(accum):
        groups: dict = {}
        for e in range(j, real, accum):
            groups.setdefault(key(e), []).append(e)
        micro_rows.append([[group[i] for i in row] for group in groups.values()
                           for row in first_fit_decreasing([lengths[e] for e in group], row_length)])
    needed = max([len(r) for r in micro_rows] + [1])
    q = min(math.ceil(max(needed, min_rows) / step) * step, most)
    return slots, real, lengths, micro_rows, q * accum


def pack_batch(examples: Sequence[dict[str, np.ndarray]], *, row_length: int, pad_id: int = 0,
               slots: int | None = None, real: int | None = None, accum: int = 1, shards: int = 1,
               min_rows: int = 0) -> dict[str, np.ndarray]:
    """Pack examples[:real] (default all) into one batch with `slots` example slots (default
    len(examples)); slots past `real` are padding examples (their scalars 0, example_mask 0)."""
    slots, real, lengths, micro_rows, num_rows = _layout(
        examples, row_length=row_length, slots=slots, real=real, accum=accum, shards=shards, min_rows=min_rows)
    batch: dict[str, np.ndarray] = {}
    for key, value in examples[0].items():
        if value.ndim == 0:
            batch[key] = np.zeros((slots,), value.dtype)
        elif value.ndim == 1:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = np.full((num_rows, row_length), fill, value.dtype)
        else:
            raise TenureError(f"data.pack: field {key!r} has {value.ndim} dimensions; only per-token "
                              "sequences and scalars pack")
    batch["segment_ids"] = np.zeros((num_rows, row_length), np.int32)
    batch["positions"] = np.zeros((num_rows, row_length), np.int32)
    batch["example_row"] = np.zeros((slots,), np.int32)
    batch["example_start"] = np.zeros((slots,), np.int32)
    batch["example_mask"] = np.zeros((slots,), np.float32)
    batch["example_mask"][:real] = 1.0
    for j, rows in enumerate(micro_rows):
        for q_index, row in enumerate(rows):
            r, at = q_index * accum + j, 0
            for segment, e in enumerate(row, start=1):
                n = lengths[e]
                for key, value in examples[e].items():
                    if value.ndim == 0:
                        batch[key][e] = value
                    else:
                        batch[key][r, at:at + n] = value
                batch["segment_ids"][r, at:at + n] = segment
                batch["positions"][r, at:at + n] = np.arange(n)
                batch["example_row"][e], batch["example_start"][e] = r, at
                at += n
    return batch


def pack_rows(examples: Sequence[dict[str, np.ndarray]], *, row_length: int, pad_id: int = 0,
              slots: int | None = None, real: int | None = None, accum: int = 1, shards: int = 1,
              min_rows: int = 0) -> dict[str, np.ndarray]:
    """Per-token kinds (sft): examples[:real] packed into rows as `pack_batch` lays them out, but
    every per-example field is per row, as in an unpacked batch: examples that differ in one (a
    mixed batch's task_id) never share a row, and example_mask marks the rows holding examples.
    A segment's first label is IGNORE, so no token predicts the next example's first (unpacked,
    nothing predicts position 0 either): with block-diagonal causal attention and positions
    restarting per segment, the loss is the unpacked batch's, over the same labelled tokens."""
    scalars = lambda e: tuple((k, v.item()) for k, v in examples[e].items() if v.ndim == 0)  # noqa: E731
    _, _, lengths, micro_rows, num_rows = _layout(
        examples, row_length=row_length, slots=slots, real=real, accum=accum, shards=shards, min_rows=min_rows,
        key=scalars)
    batch: dict[str, np.ndarray] = {}
    for key, value in examples[0].items():
        if value.ndim > 1:
            raise TenureError(f"data.pack: field {key!r} has {value.ndim} dimensions; only per-token "
                              "sequences and scalars pack")
        fill = IGNORE if key == "labels" and value.ndim else pad_id if key == "input_ids" else 0
        batch[key] = np.full((num_rows, row_length) if value.ndim else (num_rows,), fill, value.dtype)
    batch["segment_ids"] = np.zeros((num_rows, row_length), np.int32)
    batch["positions"] = np.zeros((num_rows, row_length), np.int32)
    batch["example_mask"] = np.zeros((num_rows,), np.float32)
    for j, rows in enumerate(micro_rows):
        for q_index, row in enumerate(rows):
            r, at = q_index * accum + j, 0
            for segment, e in enumerate(row, start=1):
                n = lengths[e]
                for key, value in examples[e].items():
                    if value.ndim:
                        batch[key][r, at:at + n] = value
                    else:
                        batch[key][r] = value
                batch["labels"][r, at] = IGNORE
                batch["segment_ids"][r, at:at + n] = segment
                batch["positions"][r, at:at + n] = np.arange(n)
                at += n
            batch["example_mask"][r] = 1.0
    return batch


def global_rows(local_rows: np.ndarray, local_blocks: Sequence[int], block: int) -> np.ndarray:
    """Rows of a process's batch -> rows of the global batch, where the process holds the global
    row blocks `local_blocks` (block indices, ascending) of `block` rows each, in that order (as
    `jax.make_array_from_process_local_data` lays them out)."""
    local_rows = np.asarray(local_rows)
    return (np.asarray(local_blocks)[local_rows // block] * block + local_rows % block).astype(local_rows.dtype)
