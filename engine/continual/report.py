"""What a run leaves behind about forgetting: the accuracy matrix R[stage, task] with its
summaries, as a printed table, `forgetting.json`, `forgetting.csv` and a PNG with a panel per
task: its metric over the run's steps, with the stage boundaries marked.

`forgetting.json` is the contract `tenure study` reads:
  tasks, stages, metric {task: name}, direction {task: max|min}, split {task: test|validation}
  (the split each R column is scored on), start_row [T], R [S][T],
  summary (tenure.engine.continual.forgetting_metrics.summarize of R when it is square, with each task's
  direction: forgetting > 0 means worse, for perplexity too), curves
  [{step, stage, scores {task: value}}], stage_ends [global step per stage],
  stability_gap (from stage 2 on: forgetting_metrics.stability_gap of the curves, which score
  validation where a task has it; NaN written as null), kl_to_start and weight_distance (with
  eval.kl_to_start: per stage, at the stage's last eval, each trained task's KL to the starting
  model and the backbone's L2 distance to the starting weights; null where none).
"""
from __future__ import annotations

import csv
import io
import json
import math
import pathlib

import numpy as np

from tenure.engine.runtime import atomic
from tenure.engine.continual.forgetting_metrics import stability_gap, summarize


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def forgetting_record(task_names, stage_names, metrics, directions, history, splits=None,
                      stage_tasks=None) -> dict:
    """The JSON record from the run history (start row, R rows, curves, stage ends, the stability
    gap); `splits` names the split of each task's R column, `stage_tasks` the tasks each stage trains."""
    R = [[row[t] for t in task_names] for row in history.get("R", [])]
    start = [history["start_row"][t] for t in task_names] if "start_row" in history else None
    record = {"tasks": list(task_names), "stages": list(stage_names), "metric": dict(metrics),
              "direction": dict(directions), "split": dict(splits or {}), "start_row": start, "R": R,
              "curves": history.get("curves", []), "stage_ends": history.get("stage_ends", [])}
    if history.get("R_validation"):  # rows of runs whose checkpoints predate them are None
        record["R_validation"] = [None if row is None else [row.get(t) for t in task_names]
                                  for row in history["R_validation"]]
    if R and len(R) == len(task_names):
        record["summary"] = r_summary(record)
    for key, name in (("kl_start", "kl_to_start"), ("weight_distance", "weight_distance")):
        if any(key in c for c in record["curves"]):
            record[name] = [next((c[key] for c in reversed(record["curves"]) if c["stage"] == s and key in c), None)
                            for s in range(len(record["stages"]))]
    if stage_tasks and len(stage_tasks) > 1:
        record["stability_gap"] = [_finite_or_none(s) for s in
                                   stability_gap(record["curves"], stage_tasks, dict(directions))]
    return record


def r_summary(record: dict) -> dict:
    """ACC, BWT, FWT and both forgetting measures of the record's square R, each task in its direction."""
    return summarize(np.asarray(record["R"]), start_row=record["start_row"],
                     directions=[record["direction"].get(t, "max") for t in record["tasks"]]).as_dict()


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def r_table(record: dict) -> str:
    """R as text: one row per stage (and the starting model), one column per task."""
    tasks = record["tasks"]
    width = max([len("after stage"), *(len(s) + 8 for s in record["stages"]), 10]) + 2
    splits = record.get("split") or {}
    titles = [f"{t} ({', '.join(filter(None, (record['metric'][t], splits.get(t))))})" for t in tasks]
    columns = [max(24, len(title) + 2) for title in titles]  # long lm-eval metric names stay apart
    head = "".ljust(width) + "".join(title.rjust(c) for title, c in zip(titles, columns))
    lines = [head]
    if record["start_row"] is not None:
        lines.append("start".ljust(width) + "".join(_cell(v).rjust(c) for v, c in zip(record["start_row"], columns)))
    for name, row in zip(record["stages"], record["R"]):
        lines.append(f"after {name}".ljust(width) + "".join(_cell(v).rjust(c) for v, c in zip(row, columns)))
    summary = record.get("summary")
    if summary:
        lines.append("ACC {acc:.4f}  BWT {bwt:.4f}  FWT {fwt:.4f} ({against})  forgetting (max-based) "
                     "{forgetting_max:.4f}  forgetting (first-minus-last) {forgetting_first:.4f}".format(
                         against=summary.get("fwt_against", "vs untrained head"),
                         **{k: (float("nan") if v is None else v) for k, v in summary.items()
                            if not isinstance(v, (list, str))}))
    for stage in record.get("stability_gap", []):
        dips = ", ".join(f"{t} {gap:+.4f} (worst {stage['worst_within_stage'][t]:.4f})"
                         for t, gap in stage["gap_within_stage"].items())
        lines.append(f"stability gap in {record['stages'][stage['stage']]}: {dips or '-'}  "
                     f"min-ACC {_cell(stage['min_acc'])}  WC-ACC {_cell(stage['wc_acc'])}")
    return "\n".join(lines)


# What study 2 of docs/forgetting.md measured on MiniLM (lexnames, 100 steps, 3 seeds): printed
# under a run whose untrained tasks fell; tests/test_quickstart.py checks every number against the docs.
KEEPING_IT = ("what keeps it: docs/forgetting.md study 2 (MiniLM, lexnames, 100 steps) measured embeddings "
              "nDCG@10 0.603 -> 0.312 fine-tuning everything (lexnames 0.636), 0.586 with l2sp.alpha=1 (0.517), "
              "0.508 with trainable.mode=last_n (0.562), 0.467 with trainable.mode=lora (0.686)")


def start_end_table(record: dict, trained: list[str]) -> str:
    """A one-stage run's R read across: each task's score at the start and after the stage, the
    trained task(s) first, then the tasks the run only evaluated (what the model knew before);
    `KEEPING_IT` follows when one of those fell."""
    end = record["R"][-1]
    start = record["start_row"] or [None] * len(end)
    rows, fell = [], False
    names = sorted(range(len(record["tasks"])), key=lambda i: record["tasks"][i] not in trained)
    width = max(len(f"{t} ({record['metric'][t]})") for t in record["tasks"]) + 2
    for i in names:
        task = record["tasks"][i]
        role = "the task" if task in trained else "what it knew"
        rows.append(f"{role:<14}{task + ' (' + record['metric'][task] + ')':<{width}}"
                    f"{_cell(start[i])} -> {_cell(end[i])}")
        if task not in trained and None not in (start[i], end[i]):
            fell = fell or (end[i] < start[i] if record["direction"].get(task, "max") == "max" else end[i] > start[i])
    return "\n".join(["test split, start -> end of the run", *rows, *([KEEPING_IT] if fell else [])])


def write_forgetting(run_dir: pathlib.Path, record: dict) -> None:
    """The record's files; forgetting.json last (a study takes it as the mark of a finished run)."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["row", *record["tasks"]])
    if record["start_row"] is not None:
        writer.writerow(["start", *record["start_row"]])
    for name, row in zip(record["stages"], record["R"]):
        writer.writerow([f"after {name}", *row])
    atomic.write_text(run_dir / "forgetting.csv", table.getvalue())
    plot_curves(record, run_dir / "forgetting.png")
    atomic.write_text(run_dir / "forgetting.json", json.dumps(record, indent=2))


def plot_curves(record: dict, path: pathlib.Path):
    """A panel per task (R column) on its own y axis, so a perplexity does not flatten the
    accuracies beside it: its metric over global steps, which way is better, a dashed line at
    each stage end and the stage names along the top. Saves to `path`, returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = record["tasks"]
    ncols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), dpi=100, sharex=True, squeeze=False)
    steps = [c["step"] for c in record["curves"]]
    for ax, task in zip(axes.flat, tasks):
        values = [c["scores"].get(task, np.nan) for c in record["curves"]]
        ax.plot(steps, [np.nan if v is None else v for v in values], marker="o", markersize=3)
        better = "higher" if record["direction"].get(task, "max") == "max" else "lower"
        ax.set_title(task)
        ax.set_ylabel(f"{record['metric'][task]} ({better} is better)")
        for end in record["stage_ends"][:-1]:
            ax.axvline(end, color="grey", linestyle="--", linewidth=1)
        for i, (name, end) in enumerate(zip(record["stages"], record["stage_ends"])):
            begin = record["stage_ends"][i - 1] if i else 0
            ax.text((begin + end) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=8, color="grey")
        if record["stage_ends"]:                     # the whole run, though it was evaluated only at its start
            pad = 0.02 * record["stage_ends"][-1]
            ax.set_xlim(-pad, record["stage_ends"][-1] + pad)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.remove()                                  # the last row's unused cells
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig
