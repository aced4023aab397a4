"""What a study concludes in one cell: each swept method's point chosen on validation, every row's
paired difference to the reference method, and forgetting at matched learning.

Rows are the cell table's (one per method and sweep point) with per-seed test figures; the
validation figures the selection reads come separately. Everything here is computed from the
runs' JSON (engine/study/aggregate.py), never by running anything.
"""
from __future__ import annotations

import math

import numpy as np

from tenure.engine.study.stats import dominated_rows, interpolate_rows, mean_ci, percentile_interval, resample_indices


def figure_direction(figure: str, table: dict) -> str | None:
    """"max" when a larger value of `figure` is better, "min" when a smaller one is, None for a mean
    over tasks whose metrics go opposite ways (ACC, mean of the diagonal). Forgetting and drop are
    bad and BWT and FWT good whatever the metric (the engine orients them); a task's own figures,
    and the newest task's learning, follow its metric."""
    direction = table["direction"]
    if figure.startswith(("forgetting", "drop/")):
        return "min"
    if figure in ("bwt", "fwt"):
        return "max"
    if figure == "learning_newest":
        return direction.get(table.get("newest"), "max")
    prefix, sep, task = figure.partition("/")
    if sep:
        return direction.get(task, "max")
    kinds = set(direction.values())
    return None if len(kinds) > 1 else kinds.pop() if kinds else "max"


def _by_seed(row: dict, key: str) -> dict[int, float]:
    return {seed: value for seed, value in zip(row["seeds"], row["per_seed"].get(key, []))
            if value is not None and math.isfinite(value)}


def _estimate(mean: float, lo: float, hi: float, n: int) -> dict:
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def select_points(rows: list[dict], validation: dict[str, dict[int, float]], figure: str, best: str) -> dict:
    """method -> its row best on validation (mean of `figure` over seeds), for methods with
    more than one row. `validation`: variant -> seed -> the run's validation value."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    chosen = {}
    for method, members in by_method.items():
        if len(members) < 2:
            continue
        means = [float(np.mean(list(validation[r["variant"]].values()))) for r in members]
        pick = int(np.argmax(means) if best == "max" else np.argmin(means))
        chosen[method] = {"variant": members[pick]["variant"], "validation": means[pick],
                          "candidates": {r["variant"]: m for r, m in zip(members, means)}}
    return chosen


def paired_difference(row: dict, reference: dict, key: str) -> dict:
    """Mean of row - reference over the seeds both have, with its bootstrap CI and n."""
    a, b = _by_seed(row, key), _by_seed(reference, key)
    seeds = [s for s in a if s in b]
    return _estimate(*mean_ci(np.array([a[s] - b[s] for s in seeds])))


def matched_learning(members: list[dict], reference: dict | None, learning: str, forgetting: str,
                     level: float | None, higher_learns_more: bool = True) -> dict:
    """Forgetting of one method (its rows = its sweep points) at a learning level, along the lower
    envelope of its points (means over seeds; stats.interpolate_rows): a point another of its
    points beats on both axes is skipped, in every bootstrap resample anew. `level` None: the
    reference's learning, and the result is also the difference to the reference's forgetting,
    paired by seed. Seeds: those every point (and the reference) has. A level outside the points'
    learning range is not reached: no value, no extrapolation."""
    tables = [(_by_seed(r, learning), _by_seed(r, forgetting)) for r in members]
    if reference is not None:
        ref = (_by_seed(reference, learning), _by_seed(reference, forgetting))
        tables_all = [*tables, ref]
    else:
        tables_all = tables
    seeds = sorted(set.intersection(*(set(x) & set(y) for x, y in tables_all)))
    result = {"n": len(seeds), "level": level, "points": len(members)}
    if not seeds:
        return {**result, "reached": False, "range": None}
    x_PxS = np.array([[x[s] for s in seeds] for x, _ in tables])
    y_PxS = np.array([[y[s] for s in seeds] for _, y in tables])
    idx_BxS = resample_indices(len(seeds))
    x_BxP, y_BxP = x_PxS[:, idx_BxS].mean(axis=2).T, y_PxS[:, idx_BxS].mean(axis=2).T
    x_P, y_P = x_PxS.mean(axis=1), y_PxS.mean(axis=1)
    if level is None:
        ref_x_S = np.array([ref[0][s] for s in seeds])
        ref_y_S = np.array([ref[1][s] for s in seeds])
        level_B, level_value = ref_x_S[idx_BxS].mean(axis=1), float(ref_x_S.mean())
    else:
        level_B, level_value = np.full(len(idx_BxS), level), float(level)
    dominated_P = dominated_rows(x_P[None], y_P[None], higher_learns_more)[0]
    result.update(level_value=level_value, range=[float(x_P.min()), float(x_P.max())],
                  dominated=[r["variant"] for r, skip in zip(members, dominated_P) if skip])
    value = float(interpolate_rows(x_P[None], y_P[None], np.array([level_value]), higher_learns_more)[0])
    if not math.isfinite(value):
        return {**result, "reached": False}
    value_B = interpolate_rows(x_BxP, y_BxP, level_B, higher_learns_more)
    result.update(reached=True, forgetting=_estimate(value, *percentile_interval(value_B), len(seeds)),
                  unreached_resamples=float(np.mean(~np.isfinite(value_B))))
    if level is None:
        diff_B = value_B - ref_y_S[idx_BxS].mean(axis=1)
        result["difference"] = _estimate(value - float(ref_y_S.mean()), *percentile_interval(diff_B), len(seeds))
    return result


def compare(rows: list[dict], *, reference: str | None, learning: str, forgetting: str, levels: list[float],
            learning_best: str = "max", select: str | None = None, select_best: str = "max",
            validation: dict[str, dict[int, float]] | None = None) -> dict:
    """The cell's comparison (JSON-ready): selection, paired differences, matched learning and
    how many comparisons with the reference were made."""
    chosen = select_points(rows, validation or {}, select, select_best) if select else {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ref_row = None
    if reference in methods:
        ref_rows = [r for r in rows if r["method"] == reference]
        ref_row = next(r for r in ref_rows if r["variant"] == chosen[reference]["variant"]) \
            if reference in chosen else ref_rows[0]
    paired = []
    if ref_row is not None:
        for row in rows:
            if row is ref_row:
                continue
            paired.append({"variant": row["variant"], "method": row["method"],
                           **{key: paired_difference(row, ref_row, key) for key in (learning, forgetting)}})
    matched, higher = [], learning_best == "max"
    for method in methods:
        members = [r for r in rows if r["method"] == method]
        if ref_row is not None and method != reference:
            matched.append({"method": method, "at": "reference",
                            **matched_learning(members, ref_row, learning, forgetting, None, higher)})
        for level in levels:
            matched.append({"method": method, "at": level,
                            **matched_learning(members, None, learning, forgetting, level, higher)})
    count = 2 * len(paired) + sum(1 for m in matched if "difference" in m)
    return {"reference": ref_row["variant"] if ref_row else None, "learning": learning, "forgetting": forgetting,
            "levels": list(levels), "select": select, "selected": chosen, "paired": paired, "matched": matched,
            "comparisons": count}
