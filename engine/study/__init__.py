"""`tenure study STUDY.yaml`: the same staged run per method, sweep point, grid cell and seed,
then one comparison table per cell (CSV / JSON / Markdown) and PNG plots.

Pieces: `config` (the study file and its runs), `runner` (worker processes, resume, --jobs), `worker` (runs one after another in one process),
`aggregate` (forgetting.json -> tables), `stats` (bootstrap intervals, interpolation),
`compare` (selection on validation, paired differences, matched learning), `plots`
(learning vs forgetting, curves, grid). The study tool holds no per-method code: a method is a
named list of config overrides in the study file, and its sweep a mapping of keys to values.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from tenure.engine.tools.argtypes import number
from tenure.models.errors import TenureError


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study", help="run a staged experiment per method x sweep point x grid cell x seed and compare what each "
                      "forgets",
        description="Runs every (method, sweep point, grid cell, seed) as its own `tenure train` in its own run "
                    "dir (finished runs are skipped, so a killed study resumes), then writes one table per cell "
                    "(study.md / .csv / .json) with paired confidence intervals and matched-learning comparisons, "
                    "and PNG plots into the out dir.")
    p.add_argument("study", help="study YAML (base, methods, sweep, grid, seeds)")
    p.add_argument("--methods", help="comma-separated methods to run (default: all in the study)")
    p.add_argument("--seeds", type=number(int, 1, 1000), help="seeds per method, point and cell, train.seed = 0..N-1 (default: the "
                                              "study's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once; each gets cores/N threads (default 1)")
    p.add_argument("--out", help="directory for runs, tables and plots (default: the study's out, "
                                 "else runs/study/<study name>)")
    p.add_argument("--process-per-run", action="store_true",
                   help="start a fresh `tenure` process for every run (default: one worker process per job runs "
                        "its runs one after another and reuses the steps they compile alike)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="run nothing; tabulate and plot the runs already finished")
    p.add_argument("--reference", metavar="METHOD",
                   help="compare every method with METHOD (at its point chosen on validation, if it sweeps) "
                        "instead of the study's reference; tables and plots go to OUT/vs-METHOD/")
    p.set_defaults(fn=run_study)
    return p


def _plot_name(kind: str, slug: str, n_cells: int) -> str:
    return f"{kind}.png" if n_cells == 1 else f"{kind}-{slug}.png"


def _validation(by_variant: dict, figure: str) -> dict[str, dict[int, float]]:
    """variant -> seed -> `figure` on validation, for the selection: the points of swept methods."""
    from tenure.engine.study.aggregate import validation_value

    return {variant: {run.seed: validation_value(run, record, figure) for run, record in results}
            for variant, results in by_variant.items() if results[0][0].point.values}


def _direction(figure: str, key: str, table: dict) -> str:
    from tenure.engine.study import compare

    best = compare.figure_direction(figure, table)
    if best is None:
        raise TenureError(f"study key '{key}': {figure} is a mean over tasks whose metrics go opposite ways "
                          f"({', '.join(f'{t} {d}' for t, d in table['direction'].items())}); name one task's "
                          "figure (final/<task>) instead")
    return best


def analyse(runs, study) -> list[tuple[dict, dict]]:
    """(table, records by variant) per cell with a finished run: the cell table and, for a staged
    cell, its comparison (engine/study/compare.py), from the runs' JSON alone."""
    from tenure.engine.study import aggregate, compare

    tradeoff, out = study.tradeoff, []
    for cell, by_variant in aggregate.collect(runs):
        if not by_variant:
            continue
        table = aggregate.cell_table(cell, by_variant)
        if table["kind"] != "single_task":
            best = _direction(study.select, "select", table) if study.select else "max"
            table["comparison"] = compare.compare(
                table["rows"], reference=study.reference_method, learning=tradeoff.learning,
                forgetting=tradeoff.forgetting, levels=tradeoff.levels,
                learning_best=_direction(tradeoff.learning, "tradeoff.learning", table),
                select=study.select, select_best=best,
                validation=_validation(by_variant, study.select) if study.select else None)
            table["predictors"] = aggregate.predictors(by_variant, tradeoff.forgetting)
            table["predictors_of"] = tradeoff.forgetting
        out.append((table, {v: [rec for _, rec in results] for v, results in by_variant.items()}))
    return out


def report(runs, out: pathlib.Path, title: str, study, stream=None) -> list[dict]:
    """Tables and plots from the finished runs among `runs`; prints the tables. Returns the tables.
    A staged cell gets the learning-vs-forgetting plot; single-task cells do not (nothing is
    forgotten); a grid with a numeric axis gets `grid.png` (the study's `grid_plot`, else
    plots.grid_axes's default)."""
    from tenure.engine.study import aggregate, plots

    stream = stream or sys.stdout
    grid_keys = list(study.grid)
    analysed = analyse(runs, study)
    n_cells = len({run.cell for run in runs})
    tables = []
    for table, records in analysed:
        name = lambda kind: out / _plot_name(kind, table["slug"], n_cells)  # noqa: E731
        table["plots"] = {} if table["kind"] == "single_task" else {
            "tradeoff": str(plots.tradeoff(table, name("tradeoff")))}
        table["plots"]["curves"] = str(plots.curves(table, records, name("curves")))
        tables.append(table)
    if not tables:
        return []
    axes = plots.grid_axes(tables, grid_keys, study.grid_plot) if len(tables) > 1 else None
    figures = [str(plots.grid(tables, grid_keys, *axes, out / "grid.png"))] if axes else []
    paths = aggregate.write_tables(tables, out, title, grid_keys)
    print("\n" + aggregate.tables_markdown(tables, grid_keys), file=stream)
    print(f"\nwrote {paths['md']}, {paths['csv'].name}, {paths['json'].name} and "
          f"{', '.join(pathlib.Path(p).name for p in [*(p for t in tables for p in t['plots'].values()), *figures])}",
          file=stream)
    return tables


def run_study(args) -> int:
    """`tenure study`: 0 when every run finished, 1 when any failed or is missing."""
    from tenure.engine.study.config import check_figures, default_out, load_study, plan_runs, \
        reuse_equal_runs, share_first_stage
    from tenure.engine.study.runner import WorkerPool, run_all

    study = load_study(args.study, reference=args.reference)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == []:  # `--methods ""`: not "all of them"
        raise TenureError("--methods: name at least one of the study's methods (comma-separated)")
    reference = study.reference_method
    if methods is not None and args.reference is not None and reference not in methods:
        raise TenureError(f"--reference {reference}: not among --methods ({', '.join(methods)}); the comparison with "
                          "it would be left out of the tables")
    out = pathlib.Path(args.out) if args.out else default_out(args.study, study)
    if out.exists() and not out.is_dir():
        raise TenureError(f"--out {out}: that is a file; give a directory")
    runs = reuse_equal_runs(plan_runs(study, args.study, out, methods=methods, seeds=args.seeds))
    check_figures(study, runs)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if args.aggregate_only:
        missing = [run for run in runs if not run.result.is_file()]
        print(f"{len(runs)} runs: {len(runs) - len(missing)} finished, {len(missing)} not (--aggregate-only)")
    else:
        planned = runs if methods is None else reuse_equal_runs(plan_runs(study, args.study, out, seeds=args.seeds))
        first, runs = share_first_stage(runs, out, planned)
        with WorkerPool() as workers:
            pool = None if args.process_per_run else workers
            if first:
                print(f"first stage shared by the methods that differ only later: {len(first)} run"
                      f"{'s' * (len(first) > 1)} in {out / '*' / 'first_stage'}", flush=True)
                run_all(first, jobs=args.jobs, pool=pool)  # a failed one fails its branches, which say so
            twins = [run for run in runs if run.same_as is not None]
            if twins:
                print(f"{len(twins)} run{'s' * (len(twins) > 1)} equal to an earlier one's config, read from it: "
                      + ", ".join(f"{run.name} = {run.same_as.name}" for run in twins[:3])
                      + (", ..." if len(twins) > 3 else ""), flush=True)
            trained = [run for run in runs if run.source is None and run.same_as is None]
            interpolated = [run for run in runs if run.source is not None]
            read_later = {run.source.run_dir for run in interpolated}
            prune = lambda run: not study.keep_checkpoints and run.run_dir not in read_later  # noqa: E731
            failed = run_all(trained, jobs=args.jobs, pool=pool, prune=prune).failed
            if interpolated:  # after the runs they read; a missing one fails with a line naming it
                failed += run_all(interpolated, jobs=args.jobs, pool=pool).failed
        missing = [run for run, _ in failed]
    tables_dir = out / f"vs-{args.reference}" if args.reference else out  # the study's own tables stay
    tables_dir.mkdir(exist_ok=True)
    tables = report(runs, tables_dir.resolve(), f"Study {pathlib.Path(args.study).stem}", study)
    for run, reason in failed:
        print(f"failed: {run.name}: {reason}", file=sys.stderr)
    if not tables:
        raise TenureError(f"{args.study}: no run finished, nothing to tabulate")
    return 1 if missing else 0
