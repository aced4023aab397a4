"""From the runs' ``forgetting.json`` (and ``summary.json``) to one comparison table per grid cell.

Staged runs, per method and sweep point (over its seeds): the final score on each task (the
last row of R), ACC, BWT, FWT, forgetting max-based (Chaudhry) and first-minus-last (Avalanche),
learning on the newest task (R[T-1, T-1]) and the mean of the diagonal (mean_j R[j, j],
"learning accuracy"), each as the mean with its 95% bootstrap interval over seeds
(engine/study/stats.py; the standard error is kept in the JSON and CSV); n = 1 has no interval.
NaN values (e.g. BWT of a one-task run) are left out of the mean; a column with none is "—".
Then engine/study/compare.py's comparison per cell: the point of each swept method chosen on
validation, paired differences to the reference method, forgetting at matched learning.

Single-task runs (one stage, one task: a plain fine-tune) get the SINGLE columns instead,
read from what the run wrote to ``summary.json``: test and validation score of the result
(the best checkpoint), the train/validation loss gap the overfitting monitor logged
(``validation/generalization_gap``: validation loss minus the mean training loss since the
previous eval) at the best step and at the last eval, the best step, whether early stopping
and the overfitting monitor fired (seeds that fired / seeds) and at which step.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any

import numpy as np
import pydantic
from pydantic import BaseModel, ConfigDict

from tenure.engine.continual.forgetting_metrics import summarize
from tenure.engine.study.config import COUNTS, SINGLE, STATS, Cell, Run
from tenure.engine.study.stats import mean_ci
from tenure.models.errors import TenureError


class CurvePoint(BaseModel):
    step: int
    stage: int
    scores: dict[str, float | None]


class ForgettingRecord(BaseModel):
    """``<run_dir>/forgetting.json`` as the engine writes it at the end of `tenure train`."""

    model_config = ConfigDict(extra="ignore")

    tasks: list[str]
    stages: list[str]
    metric: dict[str, str]
    direction: dict[str, str]
    start_row: list[float | None] | None = None
    R: list[list[float | None]]
    R_validation: list[list[float | None] | None] | None = None  # R's rows on validation, the same weights
    summary: dict[str, Any] | None = None
    curves: list[CurvePoint] = []
    stage_ends: list[int] = []
    kl_to_start: list[dict[str, float | None] | None] | None = None   # per stage (eval.kl_to_start)
    weight_distance: list[float | None] | None = None


class MonitorEvent(BaseModel):
    step: int   # global step
    stage: int


class RunSummary(BaseModel):
    """The part of ``<run_dir>/summary.json`` a single-task table reads."""

    model_config = ConfigDict(extra="ignore")

    final: dict[str, float | None]
    best_step: int
    evals: list[dict[str, Any]]          # {"step", "stage", "validation/...": value} per validation eval
    early_stops: list[MonitorEvent]
    overfit_warnings: list[MonitorEvent]


def _load(model, path: pathlib.Path):
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise TenureError(f"{path}: missing (the run wrote forgetting.json but not this)") from None
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"])
        raise TenureError(f"{path}: key '{key}': {error['msg']}") from None


def load_record(path: pathlib.Path) -> ForgettingRecord:
    return _load(ForgettingRecord, path)


def load_summary(path: pathlib.Path) -> RunSummary:
    return _load(RunSummary, path)


class ValidationSource(BaseModel):
    """The part of ``<run_dir>/summary.json`` the validation matrix reads: every split's scores of
    the starting model and of the run's result."""

    model_config = ConfigDict(extra="ignore")

    baseline: dict[str, float | None]
    final: dict[str, float | None]


def validation_record(record: ForgettingRecord, source: ValidationSource) -> ForgettingRecord:
    """The run's R and start row on the VALIDATION split (None where a task has none): row i the
    validation scores of the weights R's row i is taken from (the engine records them, whether the
    stage ended on its last step, its best checkpoint or a guard's pick), the start row the
    baseline's validation scores. Runs from before the engine recorded them: a single-task run's
    best checkpoint's (summary.json), else the eval at each stage's last step."""
    multi = len(record.tasks) > 1

    def key(task: str) -> str:
        return f"validation/{task + '/' if multi else ''}{record.metric.get(task, 'score')}"

    start = [source.baseline.get(key(t)) for t in record.tasks]
    if record.R_validation and all(row is not None for row in record.R_validation):
        rows = record.R_validation
    elif is_single_task(record):
        rows = [[source.final.get(key(t)) for t in record.tasks]]
    else:
        at = {(p.stage, p.step): p.scores for p in record.curves}
        rows = [[at.get((i, end), {}).get(t) for t in record.tasks] for i, end in enumerate(record.stage_ends)]
    return record.model_copy(update={"R": rows, "start_row": start, "summary": None})


def validation_value(run: Run, record: ForgettingRecord, figure: str) -> float:
    """`figure` of the run on validation; a missing value is an error (a choice made on it
    would otherwise fall back to nothing, or to test)."""
    source = _load(ValidationSource, run.summary)
    value = run_values(validation_record(record, source)).get(figure, float("nan"))
    if not math.isfinite(value):
        raise TenureError(f"{run.run_dir}: no validation value of {figure!r} (a task it reads has no validation "
                          "split); the study's 'select' chooses on validation only")
    return value


def is_single_task(record: ForgettingRecord) -> bool:
    """One stage training one task: a plain fine-tune, tabulated by SINGLE rather than STATS."""
    return len(record.stages) == 1 and len(record.tasks) == 1


def single_values(record: ForgettingRecord, summary: RunSummary) -> dict[str, float]:
    """One single-task run's SINGLE figures, as its summary.json has them (NaN where it has none)."""
    metric = record.metric.get(record.tasks[0], "score")
    gaps = {e["step"]: _nan(e.get("validation/generalization_gap")) for e in summary.evals}
    last = summary.evals[-1]["step"] if summary.evals else None
    stop, warning = summary.early_stops[:1], summary.overfit_warnings[:1]
    return {
        "test": _nan(summary.final.get(f"test/{metric}")),
        "validation": _nan(summary.final.get(f"validation/{metric}")),
        "gap_best": gaps.get(summary.best_step, float("nan")),
        "gap_last": gaps.get(last, float("nan")),
        "best_step": float(summary.best_step),
        "early_stop": float(bool(stop)),
        "early_stop_step": float(stop[0].step) if stop else float("nan"),
        "overfit": float(bool(warning)),
        "overfit_step": float(warning[0].step) if warning else float("nan"),
    }


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def run_values(record: ForgettingRecord) -> dict[str, float]:
    """One run's figures: ``final/<task>`` for each task; for tasks no stage trains (columns past
    the last stage) ``change/<task>`` (final minus the starting model) and ``drop/<task>`` (the
    change the bad way: start - final for a higher-is-better metric, final - start for a
    lower-is-better one, so > 0 is forgotten); then the STATS.

    The summary is the engine's; without one it is computed here when R is square, else NaN.
    """
    R = np.array([[_nan(x) for x in row] for row in record.R], dtype=np.float64)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] != len(record.tasks):
        raise TenureError(f"forgetting.json: R must be [stages][{len(record.tasks)} tasks], got shape {R.shape}")
    start = None if record.start_row is None else np.array([_nan(x) for x in record.start_row])
    summary = record.summary
    if summary is None:
        directions = [record.direction.get(t, "max") for t in record.tasks]
        summary = summarize(R, start, directions=directions).as_dict() if R.shape[0] == R.shape[1] else {}
    values = {f"final/{task}": float(R[-1, j]) for j, task in enumerate(record.tasks)}
    for j in range(R.shape[0], R.shape[1]):
        task = record.tasks[j]
        change = float(R[-1, j] - start[j]) if start is not None else float("nan")
        values[f"change/{task}"] = change
        values[f"drop/{task}"] = change if record.direction.get(task) == "min" else -change
    for name in ("acc", "bwt", "fwt", "forgetting_max", "forgetting_first"):
        values[name] = _nan(summary.get(name))
    values["learning_newest"] = float(R[-1, R.shape[0] - 1])  # the last stage's task, after its own stage
    values["learning_diag"] = float(np.mean(np.diagonal(R)))
    return values


def mean_se(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard error and count of the finite values (NaN, NaN, 0 when none)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    se = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else float("nan")
    return float(finite.mean()), se, int(finite.size)


def cell_table(cell: Cell, runs_by_method: dict[str, list[tuple[Run, ForgettingRecord]]]) -> dict:
    """The comparison table of one cell (JSON-ready): columns, then one row per method and sweep
    point (`runs_by_method` is keyed by Run.variant). ``kind`` is "single_task" when every run is
    a single-task run, else "forgetting"."""
    tasks, metric, direction = [], {}, {}
    for results in runs_by_method.values():
        for _, record in results:
            for task in record.tasks:
                if task not in tasks:
                    tasks.append(task)
                metric.setdefault(task, record.metric.get(task, "score"))
                direction.setdefault(task, record.direction.get(task, "max"))
    single = all(is_single_task(rec) for results in runs_by_method.values() for _, rec in results)
    if single:
        name = metric[tasks[0]]
        columns = [{"key": key, "title": title.format(metric=name), **({"count": True} if key in COUNTS else {})}
                   for key, title in SINGLE.items()]
    else:
        columns = [{"key": f"final/{t}", "title": f"{t} {metric[t]} (final)"} for t in tasks]
        untrained = [t for t in tasks if any(len(rec.R) <= rec.tasks.index(t) for results in runs_by_method.values()
                                             for _, rec in results if t in rec.tasks)]
        columns += [{"key": f"change/{t}", "title": f"{t} change from start"} for t in untrained]
        columns += [{"key": f"drop/{t}", "title": f"{t} drop from start"} for t in untrained]
        columns += [{"key": key, "title": title} for key, title in STATS.items()]
    rows = []
    for variant, results in runs_by_method.items():
        per_seed = {c["key"]: [] for c in columns}
        for run, record in results:
            values = single_values(record, load_summary(run.summary)) if single else run_values(record)
            for key in per_seed:
                per_seed[key].append(values.get(key, float("nan")))
        stats = {key: mean_se(vals) for key, vals in per_seed.items()}
        cis = {key: mean_ci(np.array(vals, dtype=np.float64))[1:3] for key, vals in per_seed.items()}
        first = results[0][0]
        rows.append({"method": first.method, "variant": variant, "point": dict(first.point.values),
                     "seeds": [run.seed for run, _ in results],
                     "mean": {k: s[0] for k, s in stats.items()}, "se": {k: s[1] for k, s in stats.items()},
                     "ci": {k: list(c) for k, c in cis.items()},
                     "n": {k: s[2] for k, s in stats.items()}, "per_seed": per_seed})
    sample = next(iter(runs_by_method.values()))[0][1]
    return {"cell": dict(cell.values), "label": cell.label, "slug": cell.slug,
            "kind": "single_task" if single else "forgetting", "tasks": tasks,
            "newest": sample.tasks[len(sample.R) - 1],  # the last stage's task (learning_newest)
            "metric": metric, "direction": direction, "columns": columns, "rows": rows}


def collect(runs: list[Run]) -> list[tuple[Cell, dict[str, list[tuple[Run, ForgettingRecord]]]]]:
    """Finished runs grouped by cell then variant (method and sweep point; plan order); variants
    without a finished run are left out."""
    grouped: dict[Cell, dict[str, list]] = {}
    for run in runs:
        by_variant = grouped.setdefault(run.cell, {})
        if run.result.is_file():
            by_variant.setdefault(run.variant, []).append((run, load_record(run.result)))
    return list(grouped.items())


def fmt(mean: float, lo: float = math.nan, hi: float = math.nan) -> str:
    """`mean [lo, hi]` (the 95% interval), or the mean alone without one; "—" for no value."""
    if mean is None or not math.isfinite(mean):
        return "—"
    digits = 3 if abs(mean) < 100 else 1
    interval = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
    return f"{mean:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if interval else "")


def fmt_cell(row: dict, column: dict) -> str:
    """mean [95% CI]; a count column (0/1 per seed) as seeds that fired / seeds."""
    key = column["key"]
    if column.get("count"):
        n = row["n"][key]
        return f"{round(row['mean'][key] * n)}/{n}" if n else "—"
    return fmt(row["mean"][key], *row["ci"][key])


def _titles(table: dict) -> list[str]:
    if table.get("kind") == "single_task":
        arrow = "↓" if table["direction"][table["tasks"][0]] == "min" else "↑"
        return [c["title"] + (f" {arrow}" if c["key"] in ("test", "validation") else "") for c in table["columns"]]
    arrows = {t: "↓" if table["direction"][t] == "min" else "↑" for t in table["tasks"]}
    return [c["title"] + (f" {arrows[c['key'].split('/', 1)[1]]}" if "/" in c["key"] else "")
            for c in table["columns"]]


def markdown(table: dict) -> str:
    titles = _titles(table)
    lines = ["| method | seeds | " + " | ".join(titles) + " |", "|---|---:|" + "---:|" * len(titles)]
    for row in table["rows"]:
        cells = [fmt_cell(row, c) for c in table["columns"]]
        lines.append(f"| {row['variant']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_markdown(tables: list[dict], grid_keys: list[str]) -> str:
    """Single-task cells with the same columns in one table: a row per (cell, method), the grid
    values first (each axis titled by its last key part)."""
    titles = _titles(tables[0])
    axes = [k.rsplit(".", 1)[-1] for k in grid_keys]
    lines = ["| " + " | ".join([*axes, "method", "seeds", *titles]) + " |",
             "|" + "---:|" * len(axes) + "---|---:|" + "---:|" * len(titles)]
    for table in tables:
        for row in table["rows"]:
            cells = [fmt_cell(row, c) for c in table["columns"]]
            values = [json.dumps(table["cell"][k]) if not isinstance(table["cell"][k], str) else table["cell"][k]
                      for k in grid_keys]
            lines.append("| " + " | ".join([*values, row["variant"], str(len(row["seeds"])), *cells]) + " |")
    return "\n".join(lines)


def predictors(by_variant: dict[str, list[tuple[Run, ForgettingRecord]]], forgetting: str) -> dict:
    """How well each measure of the runs' move away from the start predicts their `forgetting`
    figure, across every run of the cell (each seed of each method and point): Pearson r and
    Spearman rho with n, for the KL to the starting model on the last stage's own inputs (mean
    over its trained tasks) and the backbone's distance to the starting weights (Shenfeld et al.
    2025 found the KL predicts forgetting across methods where the distance does not). Only runs
    with `eval.kl_to_start` carry them; a measure with fewer than 3 runs, or constant, is left out."""
    from scipy import stats

    pairs: dict[str, list[tuple[float, float]]] = {"kl_to_start": [], "weight_distance": []}
    for results in by_variant.values():
        for _, record in results:
            y = run_values(record).get(forgetting, float("nan"))
            kl = (record.kl_to_start or [None])[-1]
            x = {"kl_to_start": float(np.mean(list(kl.values()))) if kl and None not in kl.values() else None,
                 "weight_distance": (record.weight_distance or [None])[-1]}
            for name, value in x.items():
                if value is not None and math.isfinite(value) and math.isfinite(y):
                    pairs[name].append((value, y))
    out = {}
    for name, xy in pairs.items():
        if len(xy) < 3:
            continue
        x, y = np.asarray(xy, float).T
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            out[name] = {"pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(stats.spearmanr(x, y)[0]),
                         "n": len(xy)}
    return out


def predictors_markdown(table: dict) -> str:
    found = table.get("predictors") or {}
    if not found:
        return ""
    what = {"kl_to_start": "KL to the starting model", "weight_distance": "distance to the starting weights"}
    lines = [f"Forgetting ({_title(table, table['predictors_of'])}) against each run's move from the start, "
             "across the cell's runs:", "", "| measure | Pearson r | Spearman rho | n |", "|---|---:|---:|---:|"]
    lines += [f"| {what[name]} | {v['pearson']:.3f} | {v['spearman']:.3f} | {v['n']} |" for name, v in found.items()]
    return "\n".join(lines)


def tables_markdown(tables: list[dict], grid_keys: list[str]) -> str:
    """Every cell's table: single-task cells of a grid in one table, staged cells one section each."""
    if len(tables) > 1 and all(t.get("kind") == "single_task" for t in tables):
        return grid_markdown(tables, grid_keys)
    parts = []
    for table in tables:
        if len(tables) > 1 or table["cell"]:
            parts += [f"## {table['label']}", ""]
        parts += [markdown(table), ""]
        if table.get("comparison"):
            parts += [comparison_markdown(table), ""]
        if table.get("predictors"):
            parts += [predictors_markdown(table), ""]
    compared = [t["comparison"]["comparisons"] for t in tables if t.get("comparison")]
    if len(compared) > 1:
        parts += [f"{sum(compared)} comparisons with the reference in all {len(compared)} cells.", ""]
    return "\n".join(parts).rstrip("\n")


def _title(table: dict, key: str) -> str:
    return STATS.get(key) or next((c["title"] for c in table["columns"] if c["key"] == key), key)


def _estimate_text(estimate: dict) -> str:
    return fmt(estimate["mean"], estimate["lo"], estimate["hi"])


def comparison_markdown(table: dict) -> str:
    """The cell's selection, paired differences and matched-learning tables (engine/study/compare.py)."""
    comparison = table["comparison"]
    learning, forgetting = (_title(table, comparison[k]) for k in ("learning", "forgetting"))
    reference = comparison["reference"]
    parts = []
    if comparison["selected"]:
        select = _title(table, comparison["select"])
        lines = [f"Chosen on validation (mean {select} over seeds; the tables report test):", "",
                 "| method | chosen | validation of each point |", "|---|---|---|"]
        for method, pick in comparison["selected"].items():
            points = ", ".join(f"{name}: {value:.3f}" for name, value in pick["candidates"].items())
            lines.append(f"| {method} | {pick['variant']} | {points} |")
        parts.append("\n".join(lines))
    if comparison["paired"]:
        lines = [f"Difference to {reference}, paired by seed (mean [95% bootstrap CI]):", "",
                 f"| method | Δ {learning} | Δ {forgetting} | n |", "|---|---:|---:|---:|"]
        for entry in comparison["paired"]:
            a, b = entry[comparison["learning"]], entry[comparison["forgetting"]]
            lines.append(f"| {entry['variant']} | {_estimate_text(a)} | {_estimate_text(b)} | {min(a['n'], b['n'])} |")
        parts.append("\n".join(lines))
    if comparison["matched"]:
        lines = [f"{forgetting} at matched {learning} (along each method's lower envelope: linear between its "
                 "points in order of learning, skipping any point another of its points beats on both axes; "
                 "no extrapolation):", "",
                 f"| method | at {learning} | {forgetting} there | minus {reference or 'reference'}'s | n |",
                 "|---|---:|---:|---:|---:|"]
        for entry in comparison["matched"]:
            at = (f"{reference}'s ({entry['level_value']:.3f})" if entry["at"] == "reference" and "level_value" in entry
                  else f"{reference}'s" if entry["at"] == "reference" else f"{entry['at']:g}")
            if entry["reached"]:
                there = _estimate_text(entry["forgetting"])
                diff = _estimate_text(entry["difference"]) if "difference" in entry else ""
                if entry["unreached_resamples"] > 0:  # the interval is over the resamples that reach it
                    there += f" (not reached in {100 * entry['unreached_resamples']:.0f}% of resamples)"
            else:
                span = entry.get("range")
                there = "not reached" + (f" (learning {span[0]:.3f}–{span[1]:.3f})" if span else " (no paired seeds)")
                diff = ""
            lines.append(f"| {entry['method']} | {at} | {there} | {diff} | {entry['n']} |")
        skipped = {e["method"]: e["dominated"] for e in comparison["matched"] if e.get("dominated")}
        if skipped:
            lines += ["", "Skipped as beaten on both axes (means over seeds): "
                      + "; ".join(", ".join(variants) for variants in skipped.values()) + "."]
        parts.append("\n".join(lines))
    parts.append(f"{comparison['comparisons']} comparisons with the reference in this table (each a 95% interval, "
                 "not corrected for their number: about 1 in 20 excludes 0 by chance where nothing differs).")
    return "\n\n".join(parts)


SINGLE_NOTES = ("Mean [95% percentile bootstrap interval] over seeds, from each run's summary.json. Test and "
                "validation score: the "
                "result of the run (its best checkpoint by validation score). Loss gap: validation loss minus the "
                "mean training loss since the previous evaluation, as the overfitting monitor logs it "
                "(validation/generalization_gap), at the best step and at the last evaluation (where the run "
                "ended). Early stop / overfit warning fired: seeds where early stopping ended the run / the "
                "overfitting monitor warned (validation not improving while the training loss falls), and the "
                "mean step where it did (over those seeds).")
NOTES = ("Mean [95% percentile bootstrap interval over seeds, 10,000 resamples]; all on the test split. "
         "ACC, BWT and FWT as in GEM (Lopez-Paz & Ranzato 2017; FWT "
         "against the starting model); forgetting (max) = max over earlier stages minus final (Chaudhry "
         "2018), forgetting (first) = right after its own stage minus final (Avalanche); both averaged "
         "over all tasks but the last. Learning (newest task) = R[T-1, T-1]; learning (mean of diagonal) "
         "= mean_j R[j, j], each task right after its own stage. A task that no stage trains (evaluated "
         "only) also gets its change from the starting model (final minus start). ↑ / ↓: higher / lower "
         "is better.")


def write_tables(tables: list[dict], out: pathlib.Path, title: str, grid_keys: list[str]) -> dict[str, pathlib.Path]:
    """study.md, study.csv and study.json in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "study.md", "csv": out / "study.csv", "json": out / "study.json"}
    notes = "\n\n".join(dict.fromkeys(SINGLE_NOTES if t.get("kind") == "single_task" else NOTES for t in tables))
    paths["md"].write_text("\n".join([f"# {title}", "", notes, "", tables_markdown(tables, grid_keys), ""]))
    keys = []
    for table in tables:
        keys += [c["key"] for c in table["columns"] if c["key"] not in keys]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        parts = ("mean", "se", "lo", "hi")
        writer.writerow([*grid_keys, "method", "variant", "seeds", *(f"{k}_{s}" for k in keys for s in parts)])
        for table in tables:
            for row in table["rows"]:
                values = [(row["mean"].get(k, math.nan), row["se"].get(k, math.nan),
                           *row["ci"].get(k, (math.nan, math.nan))) for k in keys]
                writer.writerow([*(table["cell"].get(g, "") for g in grid_keys), row["method"], row["variant"],
                                 len(row["seeds"]),
                                 *("" if not math.isfinite(v) else repr(v) for four in values for v in four)])
    document = {"title": title, "notes": notes, "cells": _finite_or_null(tables)}
    paths["json"].write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    return paths


def _finite_or_null(tree):
    """NaN / inf -> null, so study.json is strict JSON."""
    if isinstance(tree, dict):
        return {k: _finite_or_null(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_finite_or_null(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree
