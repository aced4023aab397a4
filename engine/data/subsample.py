"""Training-data knobs for studies: a seeded subset and injected label noise.

`subsample_and_corrupt` is pure: it takes the training records (canonical dicts) and the
`data` config, and returns new records plus a report; the input is never modified.

- ``data.subset: N`` keeps N records chosen by a seeded shuffle (the first N of a
  permutation drawn from ``data.seed``), returned in their original order. Subsets of one
  seed are nested: the 100 records of ``subset: 100`` are among the 1000 of ``subset: 1000``,
  and ``subset`` equal to the record count keeps everything unchanged.
- ``data.label_noise: p`` flips ``round(p * n)`` of the kept records, chosen by a second
  seeded stream, each to a label drawn uniformly from the *other* labels, so a flipped label
  never equals the original. The subset does not depend on ``label_noise`` (separate
  streams), so a noisy cell trains on the same examples as its clean twin.

Validation and test splits are the caller's business: call this on training records only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tenure.models.errors import TenureError

_SUBSET_STREAM, _NOISE_STREAM = 0x5B5E7, 0x1AB31  # keep the two draws independent of each other


def subsample_and_corrupt(records: Sequence[dict], cfg, label_field: str | None,
                          labels: Sequence | None) -> tuple[list[dict], dict]:
    """Apply ``cfg.subset`` then ``cfg.label_noise`` (seeded by ``cfg.seed``) to training records.

    ``label_field``: the record key holding the class label (``"label"``), or None for
    unlabelled data. ``labels``: every label a record may be flipped to (the task's label
    vocabulary; at least two). Returns ``(records, report)``; the report has the counts
    ``records`` (in), ``kept``, ``flipped`` and the settings used.
    """
    subset = getattr(cfg, "subset", None)
    noise = float(getattr(cfg, "label_noise", 0.0) or 0.0)
    seed = int(cfg.seed)
    total = len(records)
    if not 0.0 <= noise < 1.0:
        raise TenureError(f"data.label_noise: must be in [0, 1), got {noise}")
    report = {"records": total, "subset": subset, "kept": total, "label_noise": noise, "flipped": 0,
              "flipped_examples": []}
    if subset is None and noise == 0.0:
        return [records[i] for i in range(total)], report

    indices = np.arange(total)
    if subset is not None:
        if subset < 1:
            raise TenureError(f"data.subset: must be at least 1, got {subset}")
        if subset > total:
            raise TenureError(f"data.subset: {subset} is more than the {total} training records")
        order = np.random.default_rng([seed, _SUBSET_STREAM]).permutation(total)
        indices = np.sort(order[:subset])
    kept = [records[int(i)] for i in indices]
    report["kept"] = len(kept)
    if noise == 0.0:
        return kept, report

    if label_field is None or labels is None:
        raise TenureError("data.label_noise: this task's data has no class labels to flip")
    choices = list(dict.fromkeys(labels))
    if len(choices) < 2:
        raise TenureError(f"data.label_noise: needs at least 2 labels to flip between, got {choices}")
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    n_flip = int(round(noise * len(kept)))
    chosen = np.sort(rng.permutation(len(kept))[:n_flip])
    for k in chosen:
        record = kept[int(k)]
        old = record.get(label_field)
        if isinstance(old, list) or old not in choices:
            what = "a list (token tags)" if isinstance(old, list) else f"{old!r}, not in the label set"
            where = record.get("location", f"record {int(indices[k])}")
            raise TenureError(f"data.label_noise: {where}: field '{label_field}' is {what}")
        others = [label for label in choices if label != old]
        new = others[int(rng.integers(len(others)))]
        kept[int(k)] = {**record, label_field: new}
        if len(report["flipped_examples"]) < 5:
            report["flipped_examples"].append(
                {"location": record.get("location"), "from": old, "to": new})
    report["flipped"] = n_flip
    return kept, report


def describe(report: dict) -> str:
    """One line for the run log, e.g. 'train data: kept 100 of 8000 records (data.subset); flipped 20 labels (20%)'."""
    parts = []
    if report.get("subset") is not None:
        parts.append(f"kept {report['kept']} of {report['records']} records (data.subset, seeded)")
    if report.get("label_noise"):
        parts.append(f"flipped {report['flipped']} of {report['kept']} labels "
                     f"(data.label_noise={report['label_noise']:g})")
    return "train data: " + "; ".join(parts) if parts else "train data: all records, no label noise"
