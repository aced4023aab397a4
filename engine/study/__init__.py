"""`tenure study STUDY.yaml`: the same staged run per method, grid cell and seed, then one
comparison table per cell (CSV / JSON / Markdown) and PNG plots.

Pieces: `config` (the study file and its runs), `runner` (subprocesses, resume, --jobs),
`aggregate` (forgetting.json -> tables), `plots` (Pareto and curves). The study tool holds
no per-method code: a method is a named list of config overrides in the study file.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from models.errors import TenureError


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study", help="run a staged experiment per method x grid cell x seed and compare what each forgets",
        description="Runs every (method, grid cell, seed) as its own `tenure train` in its own run dir "
                    "(finished runs are skipped, so a killed study resumes), then writes one table per cell "
                    "(study.md / .csv / .json) and PNG plots into the out dir.")
    p.add_argument("study", help="study YAML (base, methods, grid, seeds)")
    p.add_argument("--methods", help="comma-separated methods to run (default: all in the study)")
    p.add_argument("--seeds", type=int, help="seeds per method and cell, train.seed = 0..N-1 (default: the study's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once; each gets cores/N threads (default 1)")
    p.add_argument("--out", help="directory for runs, tables and plots (default: the study's out, "
                                 "else runs/study/<study name>)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="run nothing; tabulate and plot the runs already finished")
    p.set_defaults(fn=run_study)
    return p


def _plot_name(kind: str, slug: str, n_cells: int) -> str:
    return f"{kind}.png" if n_cells == 1 else f"{kind}-{slug}.png"


def report(runs, out: pathlib.Path, title: str, grid_keys: list[str], pareto_axes=("forgetting_max", "learning_diag"),
           stream=None, grid_plot=None) -> list[dict]:
    """Tables and plots from the finished runs among `runs`; prints the tables. Returns the tables.
    Single-task cells get no Pareto plot (nothing is forgotten); a grid with a numeric axis gets
    `grid.png` (the study's `grid_plot`, else plots.grid_axes's default)."""
    from engine.study import aggregate, plots

    stream = stream or sys.stdout

    grouped = aggregate.collect(runs)
    tables = []
    for cell, by_method in grouped:
        if not by_method:
            continue
        table = aggregate.cell_table(cell, by_method)
        records = {m: [rec for _, rec in results] for m, results in by_method.items()}
        table["plots"] = {} if table["kind"] == "single_task" else {
            "pareto": str(plots.pareto(table, out / _plot_name("pareto", cell.slug, len(grouped)), *pareto_axes))}
        table["plots"]["curves"] = str(plots.curves(table, records, out / _plot_name("curves", cell.slug, len(grouped))))
        tables.append(table)
    if not tables:
        return []
    axes = plots.grid_axes(tables, grid_keys, grid_plot) if len(tables) > 1 else None
    figures = [str(plots.grid(tables, grid_keys, *axes, out / "grid.png"))] if axes else []
    paths = aggregate.write_tables(tables, out, title, grid_keys)
    print("\n" + aggregate.tables_markdown(tables, grid_keys), file=stream)
    print(f"\nwrote {paths['md']}, {paths['csv'].name}, {paths['json'].name} and "
          f"{', '.join(pathlib.Path(p).name for p in [*(p for t in tables for p in t['plots'].values()), *figures])}",
          file=stream)
    return tables


def run_study(args) -> int:
    """`tenure study`: 0 when every run finished, 1 when any failed or is missing."""
    from engine.study.config import default_out, load_study, plan_runs, share_first_stage
    from engine.study.runner import run_all

    study = load_study(args.study)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    out = pathlib.Path(args.out) if args.out else default_out(args.study, study)
    runs = plan_runs(study, args.study, out, methods=methods, seeds=args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if args.aggregate_only:
        missing = [run for run in runs if not run.result.is_file()]
        print(f"{len(runs)} runs: {len(runs) - len(missing)} finished, {len(missing)} not (--aggregate-only)")
    else:
        first, runs = share_first_stage(runs, out)
        if first:
            print(f"first stage shared by the methods that differ only later: {len(first)} run"
                  f"{'s' * (len(first) > 1)} in {out / '*' / 'first_stage'}", flush=True)
            run_all(first, jobs=args.jobs)  # a failed one fails its branches, which say so
        outcome = run_all(runs, jobs=args.jobs)
        failed = outcome.failed
        missing = [run for run, _ in failed]
    tables = report(runs, out.resolve(), f"Study {pathlib.Path(args.study).stem}", list(study.grid),
                    (study.pareto.x, study.pareto.y), grid_plot=study.grid_plot)
    for run, reason in failed:
        print(f"failed: {run.name}: {reason}", file=sys.stderr)
    if not tables:
        raise TenureError(f"{args.study}: no run finished, nothing to tabulate")
    return 1 if missing else 0
