"""Seeded EDA-style augmentation and import of externally generated (synthetic) examples.

Augmented and imported records carry ``synthetic: True`` so evaluations can report them
apart from the user's own data. Augmentation is lazy and keyed by (seed, index), so a
record's augmented copies are the same whatever order or process reads them.
"""

import functools
import os
import re
from collections.abc import Sequence
from typing import Literal

import grain
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tenure.engine.data.records import BadRecordReport, validate
from tenure.engine.data.sources import open_source
from tenure.models.errors import TenureError

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
# Function words EDA leaves alone: their "synonyms" change meaning or grammar.
STOPWORDS = frozenset("""a an the and or but if then else of to in on at by for with from as
is am are was were be been being do does did have has had i me my we our you your he him his
she her it its they them their this that these those there here what which who whom not no
so than too very can will just should would could""".split())


class AugmentConfig(BaseModel):
    """The ``data.augment`` section: EDA operations (Wei & Zou, 2019), off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    copies: int = Field(0, ge=0, description="augmented copies added per record; 0 = off")
    synonym_replacement: float = Field(
        0.1, ge=0, le=1, description="fraction of words replaced by a WordNet synonym; 0 = off")
    random_swap: float = Field(0.1, ge=0, le=1, description="fraction of words swapped pairwise; 0 = off")
    random_deletion: float = Field(0.1, ge=0, le=1, description="probability each word is deleted; 0 = off")
    wordnet_dir: str = Field("/usr/share/wordnet", description="WordNet 3 data.* files "
                             "(Debian package wordnet-base)")


def augment(records: Sequence[dict], cfg: AugmentConfig, seed: int,
            text_fields: Sequence[str] = ("text",)) -> grain.MapDataset:
    """The records, then ``cfg.copies`` augmented copies of each, as a MapDataset.

    Originals come first, unchanged (``synthetic: False`` as validation set it); copy k
    of record j is at ``len(records) * (1 + k) + j``, has ``synthetic: True`` and location
    ``<original location>#aug<k+1>``. Each copy applies one enabled operation, picked at
    random, to every string field in ``text_fields``.

    Raises:
      TenureError: if synonym replacement is on and the WordNet files are missing.
    """
    ops = _enabled_ops(cfg)
    if cfg.copies and not ops:
        raise TenureError("data.augment: copies > 0 but every operation is set to 0")
    if cfg.copies and "synonym_replacement" in ops:
        load_synonyms(cfg.wordnet_dir)  # fail now, not in a worker
    return grain.MapDataset.source(_Augmented(records, cfg, seed, tuple(text_fields)))


def load_synthetic(paths: str | list[str], fmt: str, fields: dict[str, str] | None = None,
                   on_bad_record: Literal["error", "skip"] = "error",
                   file_format: str | None = None) -> tuple[grain.MapDataset, BadRecordReport]:
    """Read externally generated examples (same formats as the user's data), tagged synthetic.

    Arguments are those of ``sources.open_source`` (``file_format``) and
    ``records.validate``; records come back with ``synthetic: True``.
    """
    source = open_source(paths, file_format)
    records, report = validate(source, fmt, fields, on_bad_record, split="synthetic",
                               path=str(paths))
    return records.map(_mark_synthetic), report


def _mark_synthetic(record: dict) -> dict:
    return {**record, "synthetic": True}


def _enabled_ops(cfg: AugmentConfig) -> tuple[str, ...]:
    return tuple(op for op in ("synonym_replacement", "random_swap", "random_deletion")
                 if getattr(cfg, op) > 0)


class _Augmented(Sequence):
    def __init__(self, records: Sequence[dict], cfg: AugmentConfig, seed: int,
                 text_fields: tuple[str, ...]):
        self._records, self._cfg, self._seed, self._fields = records, cfg, seed, text_fields

    def __len__(self) -> int:
        return len(self._records) * (1 + self._cfg.copies)

    def __getitem__(self, i: int) -> dict:
        n = len(self._records)
        if i < n:
            return self._records[i]
        copy, j = divmod(i - n, n)
        rng = np.random.default_rng([self._seed, i])
        ops = _enabled_ops(self._cfg)
        op = ops[rng.integers(len(ops))]
        record = dict(self._records[j])
        for field in self._fields:
            if isinstance(record[field], str):
                record[field] = augment_text(record[field], op, self._cfg, rng)
        record["synthetic"] = True
        record["location"] = f"{record['location']}#aug{copy + 1}"
        return record


def augment_text(text: str, op: str, cfg: AugmentConfig, rng: np.random.Generator) -> str:
    """Apply one EDA operation to whitespace-separated words; the result is single-spaced."""
    words = text.split()
    if op == "synonym_replacement":
        words = _replace_synonyms(words, cfg.synonym_replacement, load_synonyms(cfg.wordnet_dir), rng)
    elif op == "random_swap":
        words = _swap(words, cfg.random_swap, rng)
    elif op == "random_deletion":
        words = _delete(words, cfg.random_deletion, rng)
    else:
        raise ValueError(f"unknown augmentation {op!r}")
    return " ".join(words)


def _count(alpha: float, n_words: int) -> int:
    return max(1, round(alpha * n_words))


_EDGE_PUNCT = re.compile(r"^(\W*)(.*?)(\W*)$")


def _replace_synonyms(words: list[str], alpha: float, synonyms: dict[str, tuple[str, ...]],
                      rng: np.random.Generator) -> list[str]:
    """Replace every occurrence of up to alpha*n distinct content words by a synonym."""
    cores = [_EDGE_PUNCT.match(w).group(2) for w in words]
    candidates = sorted({c.lower() for c in cores if c.lower() in synonyms and c.lower() not in STOPWORDS})
    chosen = rng.permutation(len(candidates))[:_count(alpha, len(words))]
    replacement = {candidates[k]: synonyms[candidates[k]][rng.integers(len(synonyms[candidates[k]]))]
                   for k in chosen}
    out = []
    for word, core in zip(words, cores):
        new = replacement.get(core.lower())
        if new is None:
            out.append(word)
            continue
        new = new[0].upper() + new[1:] if core[:1].isupper() else new
        prefix, _, suffix = _EDGE_PUNCT.match(word).groups()
        out.append(prefix + new + suffix)
    return out


def _swap(words: list[str], alpha: float, rng: np.random.Generator) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(_count(alpha, len(words))):
        a, b = rng.choice(len(words), size=2, replace=False)
        words[a], words[b] = words[b], words[a]
    return words


def _delete(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    if len(words) < 2:
        return list(words)
    keep = rng.random(len(words)) >= p
    if not keep.any():  # never return an empty text
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


@functools.lru_cache(maxsize=2)
def load_synonyms(wordnet_dir: str) -> dict[str, tuple[str, ...]]:
    """word -> sorted synonyms (other lemmas of its synsets), parsed from WordNet data files.

    A data line is ``offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] ...``;
    multi-word lemmas use ``_`` and adjectives may carry a marker like ``(a)``.
    """
    paths = [os.path.join(wordnet_dir, name) for name in WORDNET_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise TenureError(f"data.augment.synonym_replacement: WordNet file {missing[0]} not found "
                          "(install the Debian package wordnet-base, set data.augment.wordnet_dir, "
                          "or set synonym_replacement: 0)")
    synonyms: dict[str, set[str]] = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, start=1):
                if line.startswith("  ") or not line.strip():  # licence header, a trailing blank line
                    continue
                parts = line.split(" ", 4 + 2 * 255)
                try:
                    n_words = int(parts[3], 16)
                except (IndexError, ValueError):
                    raise TenureError(f"{path}:{line_number}: not a WordNet 3 data line (offset lex_filenum ss_type "
                                      "w_cnt word ...); check data.augment.wordnet_dir") from None
                lemmas = {re.sub(r"\(\w+\)$", "", w).replace("_", " ").lower()
                          for w in parts[4:4 + 2 * n_words:2]}
                for lemma in lemmas:
                    synonyms.setdefault(lemma, set()).update(lemmas - {lemma})
    return {word: tuple(sorted(others)) for word, others in synonyms.items() if others}
