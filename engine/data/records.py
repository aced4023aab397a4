"""Record formats: parse raw dicts into canonical records, label vocabularies, validation.

A canonical record is a dict with the format's keys (``RECORD_FORMATS``) plus two
bookkeeping keys every record carries: ``location`` (``file:line``) and ``synthetic``
(False for data read from the user's files, True for augmented or imported examples).
"""

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import grain
import numpy as np

from tenure.engine.data.sources import BAD_RAW_KEY, select
from tenure.models.errors import TenureError

# Canonical keys of each format; ``negatives`` (retrieval) is optional and defaults to [].
RECORD_FORMATS: dict[str, tuple[str, ...]] = {
    "text_label": ("text", "label"),
    "pair": ("text_a", "text_b", "label"),
    "token_tags": ("tokens", "tags"),
    "text_target": ("text", "target"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
    "retrieval": ("query", "positive", "negatives"),
}
# The canonical fields holding free text, for cleaning and augmentation.
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "text_label": ("text",),
    "pair": ("text_a", "text_b"),
    "token_tags": ("tokens",),
    "text_target": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
    "retrieval": ("query", "positive", "negatives"),
}
# The canonical field a LabelVocab is built from, for formats that have one.
LABEL_FIELDS = {"text_label": "label", "pair": "label", "token_tags": "tags"}
CHAT_ROLES = ("system", "user", "assistant")
_OPTIONAL = {("retrieval", "negatives")}
_NONEMPTY_TEXT = {"text", "text_a", "text_b", "completion", "query", "positive"}


class BadRecord(TenureError):
    """One malformed record; the message is one line: ``file:17: field 'label': missing``."""

    def __init__(self, location: str, field: str | None, reason: str):
        self.location, self.field, self.reason = location, field, reason
        where = f"{location}: field '{field}'" if field else location
        super().__init__(f"{where}: {reason}")


def over_length_error(location: str, field: str, n_tokens: int, max_length: int) -> BadRecord:
    """The BadRecord for a record whose tokenized ``field`` exceeds ``max_length`` tokens."""
    return BadRecord(location, field, f"{n_tokens} tokens, longer than max_length {max_length}")


def ensure_not_empty(n_records: int, split: str, path: str, stage: str) -> None:
    """Raise TenureError when ``stage`` (e.g. 'validation', 'cleaning') left no records."""
    if n_records == 0:
        raise TenureError(f"{split} data {path}: no records left after {stage}")


def resolve_fields(fmt: str, fields: dict[str, str] | None) -> dict[str, str]:
    """Map every canonical key of ``fmt`` to the user's field name (default: the same name).

    Raises TenureError for an unknown format or an unknown canonical key in ``fields``.
    """
    if fmt not in RECORD_FORMATS:
        raise TenureError(f"data.format: unknown record format {fmt!r}; "
                          f"expected one of {', '.join(RECORD_FORMATS)}")
    canonical = RECORD_FORMATS[fmt]
    unknown = sorted(set(fields or {}) - set(canonical))
    if unknown:
        raise TenureError(f"data.fields: {unknown[0]!r} is not a field of format {fmt!r}; "
                          f"expected some of {', '.join(canonical)}")
    return {key: (fields or {}).get(key, key) for key in canonical}


def parse_record(location: str, raw: Any, fmt: str,
                 fields: dict[str, str] | None = None, numeric_labels: bool = False) -> dict:
    """Check one raw record and return its canonical dict, or raise BadRecord.

    Args:
      location: where the record came from (``file:line``), used in error messages.
      raw: the dict read by a source (may carry the source's unparseable-record marker).
      fmt: a key of ``RECORD_FORMATS``.
      fields: canonical key -> the user's field name; missing keys use the canonical name.
      numeric_labels: a regression task's `label` is a number (as `target` always is).
    """
    names = resolve_fields(fmt, fields)
    if isinstance(raw, dict) and BAD_RAW_KEY in raw:
        raise BadRecord(location, None, raw[BAD_RAW_KEY])
    if not isinstance(raw, dict):
        raise BadRecord(location, None, f"expected a JSON object, got {_type_name(raw)}")
    record = {}
    for key, name in names.items():
        if name not in raw or raw[name] is None:
            if (fmt, key) in _OPTIONAL:
                record[key] = []
                continue
            raise BadRecord(location, name, "missing" if name not in raw else "is null")
        kind = "target" if key == "label" and numeric_labels else key
        record[key] = _check_value(kind, raw[name], lambda reason, n=name: BadRecord(location, n, reason))
    if fmt == "token_tags" and len(record["tags"]) != len(record["tokens"]):
        raise BadRecord(location, names["tags"], f"has {len(record['tags'])} tags for "
                        f"{len(record['tokens'])} tokens in '{names['tokens']}'")
    record["location"] = location
    record["synthetic"] = False
    return record


def _check_value(key: str, value: Any, bad):
    if key == "label":
        # Floats are regression targets of pair records (STS-style); classes are str or int.
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad(f"expected a string, integer or number label, got {_type_name(value)}")
        if isinstance(value, str) and not value.strip():
            raise bad("is empty")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(f"expected a finite number, got {value}")
        return value
    if key == "target":
        if isinstance(value, str):  # CSV cells are strings
            try:
                value = float(value)
            except ValueError:
                raise bad(f"expected a number, got string {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise bad(f"expected a finite number, got {value}")
        return float(value)
    if key in ("tokens", "tags", "negatives"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"expected a list of strings, got {_describe_list(value)}")
        if key != "negatives" and not value:
            raise bad("is empty")
        if key == "negatives" and not all(v.strip() for v in value):
            raise bad("contains an empty string")
        return list(value)
    if key == "messages":
        return _check_messages(value, bad)
    if not isinstance(value, str):
        raise bad(f"expected a string, got {_type_name(value)}")
    if key in _NONEMPTY_TEXT and not value.strip():
        raise bad("is empty")
    return value


def _check_messages(value: Any, bad) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("expected a non-empty list of {role, content} messages, got "
                  + ("an empty list" if isinstance(value, list) else _type_name(value)))
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad(f"message {i}: expected an object, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise bad(f"message {i}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise bad(f"message {i}: content must be a string, got {_type_name(content)}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise bad("has no non-empty assistant message to learn from")
    return messages


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _describe_list(value: Any) -> str:
    if not isinstance(value, list):
        return _type_name(value)
    bad = next(v for v in value if not isinstance(v, str))
    return f"a list containing {_type_name(bad)}"


def _label_sort_key(label: str | int):
    """Numbers (and numeric strings, as CSV gives them) in numeric order, then strings."""
    try:
        return (0, float(label), str(label))
    except ValueError:
        return (1, 0.0, str(label))


def _refuse_mixed_types(first_at: dict) -> None:
    """Refuses labels of both kinds: JSON's 1 and "1" are different values, so they would silently
    be two classes (and two names in the export). `first_at`: label -> where it first occurs."""
    number = next((label for label in first_at if not isinstance(label, str)), None)
    string = next((label for label in first_at if isinstance(label, str)), None)
    if number is not None and string is not None:
        raise TenureError(f"{first_at[number]}: label {number!r} is a number, but {first_at[string]} has the string "
                          f"label {string!r}: labels mix numbers and strings, which would be different classes; "
                          "write every label as a number or every label as a string")


class LabelVocab:
    """Class labels (or BIO tags) <-> integer ids, sorted so every run agrees."""

    def __init__(self, labels: Iterable[str | int]):
        self.labels: tuple = tuple(sorted(set(labels), key=_label_sort_key))
        self._ids = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_records(cls, records: Iterable[dict], fmt: str) -> "LabelVocab":
        """Collect the labels (``text_label``, ``pair``) or tag set (``token_tags``) of ``records``."""
        if fmt not in LABEL_FIELDS:
            raise TenureError(f"data.format: format {fmt!r} has no labels to build a vocabulary from")
        key = LABEL_FIELDS[fmt]
        first_at = {}  # label -> the location of its first record
        for record in records:
            for label in record[key] if key == "tags" else [record[key]]:
                first_at.setdefault(label, record["location"])
        _refuse_mixed_types(first_at)
        return cls(first_at)

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelVocab) and self.labels == other.labels

    def encode(self, label: str | int, location: str, field: str = "label") -> int:
        """The id of ``label``; BadRecord naming ``location`` and ``field`` if unknown."""
        try:
            return self._ids[label]
        except (KeyError, TypeError):
            known = ", ".join(map(repr, self.labels[:10])) + (", ..." if len(self) > 10 else "")
            raise BadRecord(location, field, f"unknown label {label!r} (known: {known})") from None

    def decode(self, label_id: int) -> str | int:
        return self.labels[label_id]

    def to_json(self) -> str:
        return json.dumps({"labels": list(self.labels)})

    @classmethod
    def from_json(cls, text: str) -> "LabelVocab":
        return cls(json.loads(text)["labels"])


@dataclasses.dataclass
class BadRecordReport:
    """What validation skipped: a count and the first few locations with reasons."""

    split: str
    total: int = 0
    skipped: int = 0
    first: list[str] = dataclasses.field(default_factory=list)  # up to 5 one-line messages
    max_listed: int = 5
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # "field 'x': reason" -> count

    def add(self, error: BadRecord) -> None:
        self.skipped += 1
        if len(self.first) < self.max_listed:
            self.first.append(str(error))
        reason = f"field '{error.field}': {error.reason}" if error.field else error.reason
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def __str__(self) -> str:
        line = f"{self.split}: skipped {self.skipped} of {self.total} bad records"
        return line + (f" (first: {'; '.join(self.first)})" if self.first else "")

    def as_dict(self) -> dict:
        return {"split": self.split, "total": self.total, "skipped": self.skipped,
                "first": list(self.first)}


def validate(ds: Sequence, fmt: str, fields: dict[str, str] | None = None,
             on_bad_record: Literal["error", "skip"] = "error", *,
             label_vocab: LabelVocab | None = None, split: str = "train",
             path: str = "", numeric_labels: bool = False) -> tuple[grain.MapDataset, BadRecordReport]:
    """Parse every ``(location, raw)`` element of ``ds`` once, eagerly, before training.

    Args:
      ds: a source from ``open_source`` (or any sequence of ``(location, raw)``).
      fmt, fields: as in ``parse_record``.
      on_bad_record: ``"error"`` raises the first BadRecord; ``"skip"`` drops bad records
        and counts them in the report.
      label_vocab: when given (eval splits), labels/tags outside it are bad records.
      split, path: name the data in the empty-dataset error.
      numeric_labels: labels are regression targets: each must be a number (or a numeric string).

    Returns:
      A MapDataset of canonical dicts (re-read lazily from ``ds``, so nothing is held in
      memory) and the BadRecordReport.

    Raises:
      BadRecord: on the first bad record, in ``"error"`` mode.
      TenureError: if no valid record is left.
    """
    if on_bad_record not in ("error", "skip"):
        raise TenureError(f"data.on_bad_record: expected 'error' or 'skip', got {on_bad_record!r}")
    names = resolve_fields(fmt, fields)
    report = BadRecordReport(split=split, total=len(ds))
    kept = []
    for i in range(len(ds)):
        location, raw = ds[i]
        try:
            record = parse_record(location, raw, fmt, names, numeric_labels)
            if label_vocab is not None:
                _check_labels(record, fmt, names, label_vocab)
        except BadRecord as error:
            if on_bad_record == "error":
                raise
            report.add(error)
            continue
        kept.append(i)
    ensure_not_empty(len(kept), split, path, "validation")
    parse = functools.partial(_parse_item, fmt=fmt, fields=names, numeric_labels=numeric_labels)  # picklable
    return select(ds, np.asarray(kept)).map(parse), report


def _parse_item(item: tuple[str, Any], fmt: str, fields: dict[str, str], numeric_labels: bool) -> dict:
    return parse_record(*item, fmt, fields, numeric_labels)


def _check_labels(record: dict, fmt: str, names: dict[str, str], vocab: LabelVocab) -> None:
    key = LABEL_FIELDS.get(fmt)
    if key is None:
        return
    for label in record[key] if key == "tags" else [record[key]]:
        vocab.encode(label, record["location"], names[key])
