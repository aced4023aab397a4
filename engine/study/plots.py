"""PNG plots of a study (matplotlib, Agg backend): per cell, the learning-vs-forgetting plot (a
curve per method through its sweep points) and each method's curves of every task's metric over
global steps, stage boundaries marked; per grid study, its figures against a numeric grid axis
(e.g. test score against data size)."""
from __future__ import annotations

import math
import pathlib

import numpy as np

from tenure.engine.study.compare import figure_direction
from tenure.engine.study.config import STATS, value_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _error(row: dict, key: str) -> tuple[float, float]:
    """(below, above) the mean: its 95% interval, 0 where there is none."""
    mean, (lo, hi) = row["mean"][key], row["ci"][key]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 0.0
    return mean - lo, hi - mean


def tradeoff(table: dict, path: pathlib.Path, title: str = "") -> pathlib.Path:
    """Learning (x) against forgetting (y): one curve per method through its lower envelope (the
    points the comparison did not skip as beaten on both axes, filled; the others hollow), error
    bars = 95% bootstrap intervals over seeds, the reference method's point starred and its
    learning level a dotted line (the matched levels dashed)."""
    comparison = table["comparison"]
    x, y = comparison["learning"], comparison["forgetting"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5.2), dpi=110)
    colors, markers = plt.get_cmap("tab10"), "osD^vP*X"
    methods = list(dict.fromkeys(row["method"] for row in table["rows"]))
    dominated = {variant for entry in comparison["matched"] for variant in entry.get("dominated", [])}
    plotted, labels = 0, []
    for i, method in enumerate(methods):
        rows = [r for r in table["rows"] if r["method"] == method
                and all(math.isfinite(r["mean"].get(k, math.nan)) for k in (x, y))]
        if not rows:
            continue
        rows.sort(key=lambda r: r["mean"][x])
        xerr = np.array([_error(r, x) for r in rows]).T
        yerr = np.array([_error(r, y) for r in rows]).T
        n = sorted({len(r["seeds"]) for r in rows})
        label = f"{method} ({len(rows)} point{'s' * (len(rows) > 1)}, n={'/'.join(map(str, n))})"
        x_P, y_P = np.array([r["mean"][x] for r in rows]), np.array([r["mean"][y] for r in rows])
        envelope_P = np.array([r["variant"] not in dominated for r in rows])
        ax.errorbar(x_P, y_P, xerr=xerr, yerr=yerr, marker=markers[i % 8], color=colors(i % 10), capsize=3,
                    markersize=5, linestyle="none", mfc="none", label=label)
        ax.plot(x_P[envelope_P], y_P[envelope_P], marker=markers[i % 8], color=colors(i % 10), markersize=5,
                linewidth=1.2)
        for r in rows:
            if r["variant"] == comparison["reference"]:
                ax.plot(r["mean"][x], r["mean"][y], marker="*", markersize=16, color=colors(i % 10),
                        markeredgecolor="black", linestyle="none", zorder=5, label=f"{r['variant']} (reference)")
                ax.axvline(r["mean"][x], color="grey", linestyle=":", linewidth=1)
            elif r["point"]:
                labels.append((_point_label(r["point"]), (r["mean"][x], r["mean"][y]), colors(i % 10)))
        plotted += 1
    for level in comparison["levels"]:
        ax.axvline(level, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel(_axis_label(table, x))
    ax.set_ylabel(_axis_label(table, y))
    where = f" — {table['label']}" if table["cell"] else ""
    ax.set_title(title or f"Learning vs forgetting (95% CI over seeds){where}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no run has both {STATS.get(x, x)} and {STATS.get(y, y)}",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="dimgrey")
    ax.margins(0.1)
    fig.tight_layout()
    _place_labels(fig, ax, labels)
    fig.savefig(path)
    plt.close(fig)
    return path


# where a point's label may go, in points from the point: beside it first, then further out
_OFFSETS = [(4, 4), (4, -9), (-4, 4), (-4, -9), (4, 13), (4, -18), (-4, 13), (-4, -18), (4, 22), (-4, 22)]


def _place_labels(fig, ax, labels: list[tuple[str, tuple[float, float], object]]) -> None:
    """Each point's label at the first offset where it overlaps no label already placed (points that
    sit on one another, e.g. a rank sweep's point that is another method's lr point, keep both
    labels readable); the first offset when none is free."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for text, xy, color in labels:
        for dx, dy in _OFFSETS:
            note = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), fontsize=6, color=color,
                               ha="left" if dx > 0 else "right")
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            note.remove()
        else:
            note = ax.annotate(text, xy, textcoords="offset points", xytext=_OFFSETS[0], fontsize=6, color=color)
            box = note.get_window_extent(renderer)
        placed.append(box)


def _point_label(point: dict) -> str:
    """A sweep point by its keys' last parts (rank=64, alpha=128), the whole keys where two share one."""
    short = [key.rsplit(".", 1)[-1] for key in point]
    names = short if len(set(short)) == len(short) else list(point)
    return ", ".join(f"{name}={value_text(value)}" for name, value in zip(names, point.values()))


def _axis_label(table: dict, key: str) -> str:
    title = STATS.get(key) or next((c["title"] for c in table["columns"] if c["key"] == key), key)
    better = {"min": "lower is better", "max": "higher is better", None: "its tasks' metrics go opposite ways"}
    return f"{title}  ({better[figure_direction(key, table)]})"


def _seed_curve(record, task: str) -> dict[int, float]:
    """step -> score of one run. The engine's periodic evals use the validation split only, so a
    task without one has no score there; at the stage ends its R value (on test) fills in."""
    points = {p.step: p.scores.get(task) for p in record.curves if p.scores.get(task) is not None}
    if task in record.tasks:
        j = record.tasks.index(task)
        for end, row in zip(record.stage_ends, record.R):
            if end not in points and j < len(row) and row[j] is not None:
                points[end] = row[j]
    return points


def _mean_curve(records, task: str):
    """Steps present in every seed's curve, the mean score there and its standard error."""
    per_seed = []
    for record in records:
        per_seed.append(_seed_curve(record, task))
    common = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    values = np.array([[s[step] for step in common] for s in per_seed], dtype=np.float64)
    mean = values.mean(axis=0) if common else np.array([])
    se = (values.std(axis=0, ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 and common \
        else np.zeros(len(common))
    return np.array(common), mean, se


def curves(table: dict, records_by_method: dict[str, list], path: pathlib.Path, title: str = "") -> pathlib.Path:
    """A panel per method: every task's metric over global steps (mean over seeds, ± SE band),
    dashed lines at stage ends, each stage named at the top. The engine's curves are validation
    scores; a task without a validation split is plotted from its test scores at the start and
    at every stage end (R); the tables' R is on test."""
    plt = _pyplot()
    methods = [m for m in records_by_method if records_by_method[m]]
    cols = min(3, max(1, len(methods)))
    rows = max(1, math.ceil(len(methods) / cols))
    metrics = set(table["metric"].values())
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.4, 5.2 * cols), 3.8 * rows + 0.4), dpi=100, squeeze=False,
                             sharey=len(metrics) == 1)
    colors = plt.get_cmap("tab10")
    for ax, method in zip(axes.flat, methods):
        records = records_by_method[method]
        for j, task in enumerate(table["tasks"]):
            steps, mean, se = _mean_curve(records, task)
            if steps.size == 0:
                continue
            arrow = "↓" if table["direction"].get(task) == "min" else "↑"
            ax.plot(steps, mean, marker=".", color=colors(j % 10), label=f"{task} ({table['metric'][task]} {arrow})")
            if np.any(se > 0):
                ax.fill_between(steps, mean - se, mean + se, color=colors(j % 10), alpha=0.2, linewidth=0)
        first = records[0]
        starts = [0, *first.stage_ends[:-1]]
        for end in first.stage_ends[:-1]:
            ax.axvline(end, color="grey", linestyle="--", linewidth=1)
        for name, start, end in zip(first.stages if len(first.stages) > 1 else [], starts, first.stage_ends):
            ax.text((start + end) / 2, 1.01, f"stage {name}", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color="dimgrey")
        ax.set_title(f"{method} (n={len(records)})", fontsize=10, pad=14)
        ax.set_xlabel("global step")
        ax.set_ylabel(" / ".join(sorted(metrics)) + " (validation, else test)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    fig.suptitle(title or "Every task over steps" + (f" — {table['label']}" if table["cell"] else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _numeric_axis(tables: list[dict], grid_keys: list[str]) -> str | None:
    for key in grid_keys:
        values = {t["cell"].get(key) for t in tables}
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return key
    return None


def grid_axes(tables: list[dict], grid_keys: list[str], grid_plot=None) -> tuple[str, list[str]] | None:
    """(x, ys) of the grid figure: the study's `grid_plot`, else the first numeric axis with more than
    one value against test score and loss gap (single-task) or ACC and forgetting (staged); None
    when the grid has no such axis."""
    if grid_plot is not None:
        return grid_plot.x, list(grid_plot.y)
    x = _numeric_axis(tables, grid_keys)
    if x is None:
        return None
    single = all(t.get("kind") == "single_task" for t in tables)
    return x, ["test", "gap_last"] if single else ["acc", "forgetting_max"]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def grid(tables: list[dict], grid_keys: list[str], x: str, ys: list[str], path: pathlib.Path,
         title: str = "") -> pathlib.Path:
    """A panel per figure in `ys`: its mean over seeds (error bars: 95% bootstrap interval) against the grid
    axis `x`, one line per combination of the other grid axes and method. Log x when the values
    span more than a factor of 10."""
    plt = _pyplot()
    others = [k for k in grid_keys if k != x]
    methods = {row["variant"] for t in tables for row in t["rows"]}
    series: dict[str, list[tuple[float, dict]]] = {}
    for table in tables:
        for row in table["rows"]:
            parts = [f"{_short(k)}={table['cell'][k]}" for k in others] + ([row["variant"]] if len(methods) > 1 else [])
            series.setdefault(", ".join(parts) or row["variant"], []).append((table["cell"][x], row))
    fig, axes = plt.subplots(1, len(ys), figsize=(5.6 * len(ys), 4.4), dpi=110, squeeze=False)
    colors, markers = plt.get_cmap("tab10"), "osD^vP*X"
    xs = sorted({v for points in series.values() for v, _ in points})
    for ax, y in zip(axes.flat, ys):
        title_y = next((c["title"] for c in tables[0]["columns"] if c["key"] == y), STATS.get(y, y))
        for i, (label, points) in enumerate(series.items()):
            points = sorted(points, key=lambda p: p[0])
            mean = np.array([row["mean"].get(y, math.nan) for _, row in points], dtype=np.float64)
            yerr = np.array([_error(row, y) if y in row["ci"] else (0.0, 0.0) for _, row in points]).T
            ax.errorbar([v for v, _ in points], mean, yerr=yerr, marker=markers[i % 8],
                        color=colors(i % 10), capsize=3, label=label, linewidth=1.3, markersize=5)
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:g}" for v in xs])
        ax.set_xlabel(x)
        ax.set_ylabel(title_y)
        ax.set_title(title_y, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    n = {len(row["seeds"]) for t in tables for row in t["rows"]}
    fig.suptitle(title or f"Against {x} (mean, 95% CI over {'/'.join(map(str, sorted(n)))} seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
