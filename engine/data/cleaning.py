"""Deterministic text cleaning: unicode and whitespace normalisation, length filters, dedup.

Steps run in a fixed order (normalise, length filter, exact duplicates, near duplicates)
and each counts what it changed or removed, so the run log says where records went.
"""

import dataclasses
import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Literal

import grain
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tenure.engine.data.records import ensure_not_empty
from tenure.engine.data.sources import select


class CleaningConfig(BaseModel):
    """The ``data.clean`` section. Defaults change nothing but the unicode form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="unicode normalisation of every text field; NFKC also folds "
                           "compatibility characters (full-width letters, ligatures)")
    whitespace: bool = Field(
        False, description="strip ends, \\r\\n -> \\n, collapse runs of spaces/tabs to one "
                           "space and blank-line runs to one blank line (loses code indentation)")
    drop_exact_duplicates: bool = Field(
        False, description="keep the first of records whose text fields are identical "
                           "after normalisation (labels are not compared)")
    drop_near_duplicates: bool = Field(
        False, description="keep the first of records equal after casefolding and removing "
                           "punctuation and whitespace")
    length_unit: Literal["chars", "words"] = Field(
        "chars", description="unit of min_length / max_length (words = whitespace-separated)")
    min_length: int = Field(0, ge=0, description="drop records shorter than this (all text fields together)")
    max_length: int | None = Field(None, ge=1, description="drop records longer than this; null = no limit")

    @model_validator(mode="after")
    def _check_range(self):
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError(f"max_length {self.max_length} is below min_length {self.min_length}")
        return self


@dataclasses.dataclass
class CleaningReport:
    """Records seen, changed by each normalisation, removed by each filter, and kept."""

    total: int = 0
    unicode_changed: int = 0
    whitespace_changed: int = 0
    too_short: int = 0
    too_long: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"cleaning: {self.total} records; normalised unicode in {self.unicode_changed}, "
                f"whitespace in {self.whitespace_changed}; removed {self.too_short} too short, "
                f"{self.too_long} too long, {self.exact_duplicates} exact duplicates, "
                f"{self.near_duplicates} near duplicates; kept {self.kept}")


def clean(records: Sequence[dict], cfg: CleaningConfig, text_fields: Sequence[str], *,
          split: str = "train", path: str = "") -> tuple[grain.MapDataset, CleaningReport]:
    """Clean canonical records (a list or the MapDataset from ``records.validate``).

    Args:
      records: canonical dicts.
      cfg: which steps run.
      text_fields: canonical keys holding text (``records.TEXT_FIELDS[fmt]``). String
        fields and chat message contents get both normalisations; list-of-string fields
        (tokens, negatives) get unicode normalisation only, since token boundaries carry labels.
      split, path: name the data in the empty-dataset error.

    Returns:
      A MapDataset of the kept records, normalised lazily on access (the input is read
      once here, not held in memory), and the report.

    Raises:
      TenureError: if no record is left.
    """
    normalise = functools.partial(_normalise_record, cfg=cfg, text_fields=tuple(text_fields))
    report = CleaningReport(total=len(records))
    exact_seen, near_seen, kept = set(), set(), []
    for i in range(len(records)):
        record = records[i]
        texts = _texts(record, text_fields)
        unicode_texts = [_normalise_unicode(t, cfg.unicode_form) for t in texts]
        report.unicode_changed += unicode_texts != texts
        cleaned = _texts(normalise(record), text_fields)
        report.whitespace_changed += cleaned != unicode_texts
        length = _length(cleaned, cfg.length_unit)
        if length < cfg.min_length:
            report.too_short += 1
            continue
        if cfg.max_length is not None and length > cfg.max_length:
            report.too_long += 1
            continue
        if cfg.drop_exact_duplicates:
            key = _digest(json.dumps(cleaned, ensure_ascii=False))
            if key in exact_seen:
                report.exact_duplicates += 1
                continue
            exact_seen.add(key)
        if cfg.drop_near_duplicates:
            key = _digest("\x00".join(near_duplicate_key(t) for t in cleaned))
            if key in near_seen:
                report.near_duplicates += 1
                continue
            near_seen.add(key)
        kept.append(i)
    report.kept = len(kept)
    ensure_not_empty(report.kept, split, path, "cleaning")
    return select(records, np.asarray(kept)).map(normalise), report


def near_duplicate_key(text: str) -> str:
    """``text`` casefolded, without punctuation or whitespace: equal keys = near duplicates."""
    return "".join(c for c in text.casefold()
                   if not c.isspace() and not unicodedata.category(c).startswith("P"))


def clean_whitespace(text: str) -> str:
    """Strip ends, unify line endings, one space for runs of spaces/tabs, one blank line at most."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _normalise_unicode(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def _normalise_record(record: dict, cfg: CleaningConfig, text_fields: tuple[str, ...]) -> dict:
    def text(value: str) -> str:
        value = _normalise_unicode(value, cfg.unicode_form)
        return clean_whitespace(value) if cfg.whitespace else value

    out = dict(record)
    for field in text_fields:
        value = record[field]
        if isinstance(value, str):
            out[field] = text(value)
        elif value and isinstance(value[0], dict):  # chat messages
            out[field] = [{**m, "content": text(m["content"])} for m in value]
        else:
            out[field] = [_normalise_unicode(v, cfg.unicode_form) for v in value]
    return out


def _texts(record: dict, text_fields: Sequence[str]) -> list[str]:
    """Every piece of text in the record's text fields, in a fixed order."""
    texts = []
    for field in text_fields:
        value = record[field]
        if isinstance(value, str):
            texts.append(value)
        else:
            texts.extend(v["content"] if isinstance(v, dict) else v for v in value)
    return texts


def _length(texts: list[str], unit: str) -> int:
    if unit == "words":
        return sum(len(t.split()) for t in texts)
    return sum(len(t) for t in texts)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
