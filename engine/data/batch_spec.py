"""The batch contract: which fields a training batch has for a task, their axes and dtypes.

The featurizer and the collators (tenure.engine.data.tokenize, packing, batch_packing) produce these
fields from records; `tenure compile` (abstract batches) and `tenure bench` (synthetic batches)
ask `batch_fields` for them instead of writing their own list; tests/test_batch_spec.py checks
the featurizer's and the collators' batches against it.

Axes: `examples` (one per example: labels of a sequence task, example_mask, task_id), `rows`
(token rows: the examples themselves, or fewer when packed per batch), `length` (tokens per
row), `passages` (retrieval: the positive and its hard negatives).
"""
from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -100  # the label of a position that carries none (padding, prompt tokens, non-first sub-tokens)

TOKENS = ("rows", "length")
EXAMPLES = ("examples",)


@dataclasses.dataclass(frozen=True)
class Field:
    axes: tuple[str, ...]
    dtype: str


_INT, _FLOAT = "int32", "float32"


def batch_fields(kind: str, fmt: str | None = None, *, packed: bool = False, multi: bool = False) -> dict[str, Field]:
    """The fields of a training batch of task kind `kind` in record format `fmt` (None: the
    kind's default); `packed`: data.pack; `multi`: a multi-task run (examples carry task_id)."""
    from tenure.engine.data.tokenize import resolve_format
    from tenure.engine.tasks.kinds import KINDS   # the kinds import this module's IGNORE
    fmt = resolve_format(kind, fmt)
    task_kind = KINDS[kind]
    if fmt == "retrieval":
        passages = ("examples", "passages", "length")
        fields = {"query_input_ids": Field(TOKENS, _INT), "query_attention_mask": Field(TOKENS, _INT),
                  "passage_input_ids": Field(passages, _INT), "passage_attention_mask": Field(passages, _INT)}
    else:
        fields = {"input_ids": Field(TOKENS, _INT), "attention_mask": Field(TOKENS, _INT)}
        if fmt == "pair":
            fields["token_type_ids"] = Field(TOKENS, _INT)
        # one label per token (the LM heads, token tags) or one per example; a float target or an id
        fields["labels"] = Field(TOKENS if task_kind.token_labels else EXAMPLES,
                                 _FLOAT if task_kind.numeric_labels else _INT)
    if multi:
        fields["task_id"] = Field(EXAMPLES, _INT)
    fields["example_mask"] = Field(EXAMPLES, _FLOAT)
    if packed:
        fields["segment_ids"] = Field(TOKENS, _INT)
        fields["positions"] = Field(TOKENS, _INT)
        if task_kind.pack == "batch":  # where each example lies in the token rows
            fields["example_row"] = Field(EXAMPLES, _INT)
            fields["example_start"] = Field(EXAMPLES, _INT)
    return fields


def field_shapes(fields: dict[str, Field], *, examples: int, length: int, rows: int | None = None,
                 passages: int = 1) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every field for `examples` examples in `rows` token rows (default: one
    row each) of `length` tokens."""
    sizes = {"examples": examples, "rows": examples if rows is None else rows, "length": length,
             "passages": passages}
    return {name: (tuple(sizes[axis] for axis in f.axes), np.dtype(f.dtype)) for name, f in fields.items()}
