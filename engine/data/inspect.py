"""`tenure data inspect`: what the pipeline will see, per split, before any training; for a
staged run, per task.

Every split is read in skip mode (so all bad records are counted, not just the first),
cleaned as configured (augmentation is left out: the report is about your data), then
tokenised once for length statistics.
"""
from __future__ import annotations

import collections
import json

import numpy as np

from tenure.engine.data.config import DataConfig
from tenure.engine.data.pipeline import SplitReport, load_records, make_featurizer
from tenure.engine.data.records import LABEL_FIELDS, TEXT_FIELDS, LabelVocab
from tenure.engine.data.tokenize import resolve_format
from tenure.engine.tasks.kinds import KINDS

CHUNK = 256
MAX_LABELS_SHOWN = 20


def _splits(cfg: DataConfig) -> list[tuple[str, object]]:
    splits = [(f"train[{name}]" if len(cfg.sources) > 1 else "train", s.path) for name, s in cfg.sources.items()]
    return splits + [(name, paths) for name, paths in (("validation", cfg.validation), ("test", cfg.test)) if paths]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _label_lines(records: list[dict], fmt: str, task_kind: str) -> list[str]:
    if fmt == "text_target" or KINDS[task_kind].numeric_labels:  # regression reads `label` in other formats
        key = "target" if fmt == "text_target" else "label"
        targets = np.asarray([_number(r[key]) for r in records], np.float64)
        if np.isnan(targets).any():
            return [f"  targets: {int(np.isnan(targets).sum())} are not numbers (regression needs numeric "
                    f"'{key}' values)"]
        return [f"  targets: min {targets.min():.4g}  mean {targets.mean():.4g}  max {targets.max():.4g}  "
                f"std {targets.std():.4g}"]
    if fmt not in LABEL_FIELDS:
        return []
    key = LABEL_FIELDS[fmt]
    counts = collections.Counter(t for r in records for t in (r[key] if key == "tags" else [r[key]]))
    total = sum(counts.values())
    shown = ", ".join(f"{label} {n} ({100 * n / total:.1f}%)" for label, n in counts.most_common(MAX_LABELS_SHOWN))
    more = f", ... {len(counts) - MAX_LABELS_SHOWN} more" if len(counts) > MAX_LABELS_SHOWN else ""
    return [f"  {'tags' if key == 'tags' else 'labels'} ({len(counts)}): {shown}{more}"]


def _length_line(lengths: np.ndarray, max_length: int, truncate: bool) -> str:
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="lower")
    over = int((lengths > max_length).sum())
    fate = "truncated" if truncate else "bad records"
    return (f"  tokens: p50 {p50}  p90 {p90}  p99 {p99}  max {lengths.max()}; "
            f"{over} longer than max_length {max_length} ({fate})")


def _duplicates(records: list[dict], fmt: str) -> int:
    seen, dups = set(), 0
    for r in records:
        key = json.dumps([r[k] for k in TEXT_FIELDS[fmt]], ensure_ascii=False)
        dups += key in seen
        seen.add(key)
    return dups


def _split_section(name: str, paths, records: list[dict], report: SplitReport, fmt: str, featurizer,
                   cfg: DataConfig) -> list[str]:
    bad, cleaning = report.bad_records, report.cleaning
    lines = [f"{name} ({paths}): {bad.total} read, {bad.skipped} bad records, {len(records)} kept"]
    lines += [f"  bad: {msg}" for msg in bad.first]
    lines.append(f"  {cleaning}")
    lines.append(f"  exact duplicate texts remaining: {_duplicates(records, fmt)}")
    lines += _label_lines(records, fmt, featurizer.task_kind)
    lengths = np.concatenate([featurizer.lengths(records[i:i + CHUNK]) for i in range(0, len(records), CHUNK)])
    lines.append(_length_line(lengths.astype(np.int64), cfg.max_length, cfg.truncate))
    return lines


def inspect_data(cfg: DataConfig, task_kind: str, tokenizer) -> str:
    """A plain-text report: per split counts, bad records, cleaning, labels, token lengths."""
    fmt = resolve_format(task_kind, cfg.format)
    skip = cfg.model_copy(update={"on_bad_record": "skip"})
    loaded, vocab = [], None
    for name, paths in _splits(cfg):
        is_train = name.startswith("train")
        records, report = load_records(skip, paths, task_kind, split=name,
                                       label_vocab=None if is_train else vocab)
        records = [records[i] for i in range(len(records))]
        if is_train and fmt in LABEL_FIELDS and KINDS[task_kind].labelled:
            train_records = [r for _, _, rs, _ in loaded for r in rs] + records
            vocab = LabelVocab.from_records(train_records, fmt)
        loaded.append((name, paths, records, report))
    lines = [f"data: task {task_kind}, format {fmt}, max_length {cfg.max_length}, "
             f"buckets {cfg.length_buckets}"
             + (f" (eval {cfg.eval_length_buckets})" if cfg.eval_length_buckets else "")
             + f", batch {cfg.batch_size}"]
    for name, paths, records, report in loaded:
        featurizer = make_featurizer(cfg, task_kind, tokenizer, vocab, records)
        lines += _split_section(name, paths, records, report, fmt, featurizer, cfg)
    return "\n".join(lines)


def inspect_config(cfg, tokenizer) -> str:
    """inspect_data of a run config's task, or of each task of a staged run under its name (an
    lm_eval probe's documents are lm-eval's own, read by the harness, not here)."""
    if cfg.stages is None:
        return inspect_data(cfg.data, cfg.task.kind, tokenizer)
    sections = []
    for name, entry in cfg.tasks.items():
        if KINDS[entry.kind].harness:
            sections.append(f"task {name}: lm_eval probe of {', '.join(entry.tasks)} (lm-eval reads its documents; "
                            "not inspected)")
        else:
            sections.append(f"task {name}:\n" + inspect_data(entry.data, entry.kind, tokenizer))
    return "\n\n".join(sections)
