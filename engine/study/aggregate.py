"""From the runs' ``forgetting.json`` (and ``summary.json``) to one comparison table per grid cell.

Staged runs, per method (over its seeds): the final score on each task (the last row of R),
ACC, BWT, FWT, forgetting max-based (Chaudhry) and first-minus-last (Avalanche), learning on
the newest task (R[T-1, T-1]) and the mean of the diagonal (mean_j R[j, j], "learning
accuracy"), each as mean ± standard error (sample std / sqrt(n)); n = 1 has no error.
NaN values (e.g. BWT of a one-task run) are left out of the mean; a column with none is "—".

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

from engine.forgetting_metrics import summarize
from engine.study.config import COUNTS, SINGLE, STATS, Cell, Run
from models.errors import TenureError


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
    summary: dict[str, Any] | None = None
    curves: list[CurvePoint] = []
    stage_ends: list[int] = []


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
    """One run's figures: ``final/<task>`` for each task, ``change/<task>`` (final minus the
    starting model) for tasks no stage trains (columns past the last stage), then the STATS.

    The summary is the engine's; without one it is computed here when R is square, else NaN.
    """
    R = np.array([[_nan(x) for x in row] for row in record.R], dtype=np.float64)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] != len(record.tasks):
        raise TenureError(f"forgetting.json: R must be [stages][{len(record.tasks)} tasks], got shape {R.shape}")
    start = None if record.start_row is None else np.array([_nan(x) for x in record.start_row])
    summary = record.summary
    if summary is None:
        summary = summarize(R, start).as_dict() if R.shape[0] == R.shape[1] else {}
    values = {f"final/{task}": float(R[-1, j]) for j, task in enumerate(record.tasks)}
    for j in range(R.shape[0], R.shape[1]):
        values[f"change/{record.tasks[j]}"] = float(R[-1, j] - start[j]) if start is not None else float("nan")
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
    """The comparison table of one cell (JSON-ready): columns, then one row per method.
    ``kind`` is "single_task" when every run is a single-task run, else "forgetting"."""
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
        columns += [{"key": key, "title": title} for key, title in STATS.items()]
    rows = []
    for method, results in runs_by_method.items():
        per_seed = {c["key"]: [] for c in columns}
        for run, record in results:
            values = single_values(record, load_summary(run.summary)) if single else run_values(record)
            for key in per_seed:
                per_seed[key].append(values.get(key, float("nan")))
        stats = {key: mean_se(vals) for key, vals in per_seed.items()}
        rows.append({"method": method, "seeds": [run.seed for run, _ in results],
                     "mean": {k: s[0] for k, s in stats.items()}, "se": {k: s[1] for k, s in stats.items()},
                     "n": {k: s[2] for k, s in stats.items()}, "per_seed": per_seed})
    return {"cell": dict(cell.values), "label": cell.label, "slug": cell.slug,
            "kind": "single_task" if single else "forgetting", "tasks": tasks,
            "metric": metric, "direction": direction, "columns": columns, "rows": rows}


def collect(runs: list[Run]) -> list[tuple[Cell, dict[str, list[tuple[Run, ForgettingRecord]]]]]:
    """Finished runs grouped by cell then method (plan order); methods without a finished run are left out."""
    grouped: dict[Cell, dict[str, list]] = {}
    for run in runs:
        by_method = grouped.setdefault(run.cell, {})
        if run.result.is_file():
            by_method.setdefault(run.method, []).append((run, load_record(run.result)))
    return list(grouped.items())


def fmt(mean: float, se: float) -> str:
    if not math.isfinite(mean):
        return "—"
    digits = 3 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")


def fmt_cell(row: dict, column: dict) -> str:
    """mean ± SE; a count column (0/1 per seed) as seeds that fired / seeds."""
    key = column["key"]
    if column.get("count"):
        n = row["n"][key]
        return f"{round(row['mean'][key] * n)}/{n}" if n else "—"
    return fmt(row["mean"][key], row["se"][key])


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
        lines.append(f"| {row['method']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
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
            lines.append("| " + " | ".join([*values, row["method"], str(len(row["seeds"])), *cells]) + " |")
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
    return "\n".join(parts).rstrip("\n")


SINGLE_NOTES = ("Mean ± standard error over seeds, from each run's summary.json. Test and validation score: the "
                "result of the run (its best checkpoint by validation score). Loss gap: validation loss minus the "
                "mean training loss since the previous evaluation, as the overfitting monitor logs it "
                "(validation/generalization_gap), at the best step and at the last evaluation (where the run "
                "ended). Early stop / overfit warning fired: seeds where early stopping ended the run / the "
                "overfitting monitor warned (validation not improving while the training loss falls), and the "
                "mean step where it did (over those seeds).")
NOTES = ("Mean ± standard error over seeds. ACC, BWT and FWT as in GEM (Lopez-Paz & Ranzato 2017; FWT "
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
        writer.writerow([*grid_keys, "method", "seeds", *(f"{k}_{s}" for k in keys for s in ("mean", "se"))])
        for table in tables:
            for row in table["rows"]:
                values = [(row["mean"].get(k, math.nan), row["se"].get(k, math.nan)) for k in keys]
                writer.writerow([*(table["cell"].get(g, "") for g in grid_keys), row["method"], len(row["seeds"]),
                                 *("" if not math.isfinite(v) else repr(v) for pair in values for v in pair)])
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
