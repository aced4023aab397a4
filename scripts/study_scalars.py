"""Mean ± standard error over seeds of TensorBoard scalars of a study's runs, per method: the
figures `tenure study` does not put in its table (e.g. the generation metrics of an SFT task
whose R column is its perplexity). Prints a Markdown table.

    .venv/bin/python scripts/study_scalars.py runs/forgetting/decoder_lm \\
        final/test/B/rougeL@200 final/test/B/rougeL@300 final/test/B/exact_match@300

Each column is TAG@STEP (the scalar logged at that global step; `final/test/...` are the
stage-end evaluations on the test split). Runs are `<out>/<cell>/<method>/seed<k>/tb`, or
`<out>/<cell>/<method>/<sweep point>/seed<k>/tb` for a swept method.
"""
from __future__ import annotations

import argparse
import math
import pathlib

import numpy as np


def scalar(tb_dir: pathlib.Path, tag: str, step: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return math.nan
    values = [e.value for e in events.Scalars(tag) if e.step == step]
    return float(values[-1]) if values else math.nan


def mean_se(values: list[float]) -> str:
    finite = np.array([v for v in values if math.isfinite(v)])
    if not finite.size:
        return "—"
    se = f" ± {finite.std(ddof=1) / math.sqrt(finite.size):.3f}" if finite.size > 1 else ""
    return f"{finite.mean():.3f}{se}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="the study's out directory")
    parser.add_argument("columns", nargs="+", help="TAG@STEP")
    args = parser.parse_args()
    columns = [(c.rpartition("@")[0], int(c.rpartition("@")[2])) for c in args.columns]
    print("| cell | method | seeds | " + " | ".join(args.columns) + " |")
    print("|---|---|---:|" + "---:|" * len(columns))
    for cell in sorted(p for p in args.out.iterdir() if p.is_dir()):
        for method in sorted(p for p in cell.iterdir() if p.is_dir() and p.name != "first_stage"):
            # a swept method has a directory per point between it and its seeds
            points = [method] if any(method.glob("seed*")) else sorted(p for p in method.iterdir() if p.is_dir())
            for point in points:
                runs = sorted(p / "tb" for p in point.glob("seed*") if (p / "forgetting.json").is_file())
                cells = [mean_se([scalar(tb, tag, step) for tb in runs]) for tag, step in columns]
                name = method.name if point == method else f"{method.name}/{point.name}"
                print(f"| {cell.name} | {name} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
