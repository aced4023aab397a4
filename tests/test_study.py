"""`tenure study`: the study file, the run plan, the runner (resume, failures, --jobs env),
the per-cell tables (values, CSV / JSON / Markdown) and the plots.

Aggregation is tested on forgetting.json files written here by hand in the engine's
format (the thing under test is the aggregation); the runner runs tiny real commands."""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tenure.engine.continual.forgetting_metrics import summarize
from tenure.engine.study import add_study_parser, run_study
from tenure.engine.study.aggregate import mean_se
from tenure.engine.study.stats import mean_ci
from tenure.engine.study.config import Cell, Run, format_override, load_study, plan_runs
from tenure.engine.study.runner import check_resumable, run_all, thread_env
from tenure.models.errors import TenureError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_study(tmp_path, text: str, name="study.yaml") -> pathlib.Path:
    (tmp_path / "base.yaml").write_text("run_dir: runs/x\n")
    path = tmp_path / name
    path.write_text(text)
    return path


def record(R, start_row, tasks=("A", "B"), stages=None, metric="accuracy", steps_per_stage=100, curve=None):
    """A forgetting.json as the engine writes it (contract of the staged engine)."""
    stages = list(stages or tasks)
    ends = [steps_per_stage * (i + 1) for i in range(len(stages))]
    curves = [{"step": 0, "stage": 0, "scores": dict(zip(tasks, start_row))}]
    for i, end in enumerate(ends):
        mid = {t: (curve(i, t) if curve else R[i][j]) for j, t in enumerate(tasks)}
        curves.append({"step": end - steps_per_stage // 2, "stage": i, "scores": mid})
        curves.append({"step": end, "stage": i, "scores": dict(zip(tasks, R[i]))})
    rec = {"tasks": list(tasks), "stages": stages, "metric": {t: metric for t in tasks},
           "direction": {t: "max" for t in tasks}, "start_row": list(start_row), "R": R,
           "curves": curves, "stage_ends": ends}
    if len(R) == len(tasks):  # as the engine does: a summary only for a square R
        rec["summary"] = summarize(R, start_row).as_dict()
    return rec


# ---------------------------------------------------------------- the study file

@pytest.mark.parametrize("text, message", [
    ("base: base.yaml\nmethods: {naive: []}\nsteps: 3\n", "unknown study key 'steps'"),
    ("base: base.yaml\n", "missing study key 'methods'"),
    ("methods: {naive: []}\n", "missing study key 'base'"),
    ("base: base.yaml\nmethods: {}\n", "study key 'methods': Dictionary should have at least 1 item"),
    ("base: base.yaml\nmethods: {ewc: [ewc.lambda]}\n",
     "study key 'methods': method 'ewc': expected 'key.sub=value', got 'ewc.lambda'"),
    ("base: base.yaml\nmethods: {ewc: [train.seed=3]}\n",
     "study key 'methods': method 'ewc': 'train.seed' is set by the study tool for every run"),
    ("base: base.yaml\nmethods: {'a/b': []}\n", "study key 'methods': method name 'a/b'"),
    ("base: base.yaml\nmethods: {naive: []}\ngrid: {data.subset: []}\n",
     "study key 'grid': axis 'data.subset' has no values"),
    ("base: base.yaml\nmethods: {naive: []}\ngrid: {run_dir: [a]}\n",
     "study key 'grid': 'run_dir' is set by the study tool"),
    ("base: base.yaml\nmethods: {naive: []}\nseeds: 0\n",
     "study key 'seeds': Input should be greater than or equal to 1 (got 0)"),
    ("base: base.yaml\nmethods: {naive: []}\ntradeoff: {learning: loss}\n",
     "study key 'tradeoff.learning': expected one of acc, bwt, fwt, forgetting_max, forgetting_first, learning_newest, "
     "learning_diag, final/<task>, change/<task> or drop/<task>, got 'loss'"),
    ("base: base.yaml\nmethods: {naive: []}\npareto: {x: forgetting_max}\n",
     "unknown study key 'pareto' (now 'tradeoff: {learning: <its y>, forgetting: <its x>}')"),
    ("base: base.yaml\nmethods: {naive: []}\nsweep: {ewc: {ewc.lambda: [1]}}\n",
     "study key 'sweep.ewc': not a method of the study"),
    ("base: base.yaml\nmethods: {ewc: [ewc.lambda=1]}\nsweep: {ewc: {ewc.lambda: [1, 2]}}\n",
     "study key 'sweep.ewc': 'ewc.lambda' is also set by the method's overrides; set it in one place"),
    ("base: base.yaml\nmethods: {ewc: []}\nsweep: {ewc: {ewc.lambda: [1, 2]}}\ngrid: {ewc.lambda: [3]}\n",
     "study key 'sweep.ewc': 'ewc.lambda' is also a grid axis"),
    ("base: base.yaml\nmethods: {ewc: []}\nsweep: {ewc: {ewc.lambda: [1e3, 1000.0]}}\n",
     "study key 'sweep': method 'ewc': axis 'ewc.lambda' repeats a value"),
    ("base: base.yaml\nmethods: {ewc: []}\nsweep: {ewc: {ewc.lambda: []}}\n",
     "study key 'sweep': method 'ewc': axis 'ewc.lambda' has no values"),
    ("base: base.yaml\nmethods: {ewc: []}\nsweep: {ewc: {train.seed: [1, 2]}}\n",
     "study key 'sweep': method 'ewc': 'train.seed' is set by the study tool"),
    ("base: base.yaml\nmethods: {naive: []}\nsweep: {naive: {optim.lr: [1, 2]}}\n",
     "study key 'sweep.naive': the reference method sweeps, so 'select' must say which"),
    ("base: base.yaml\nmethods: {naive: []}\nreference: joint\n",
     "study key 'reference': 'joint' is not a method of the study"),
    ("base: base.yaml\nmethods: {naive: []}\nselect: loss\n",
     "study key 'select': expected one of acc, "),
    ("base: nowhere.yaml\nmethods: {naive: []}\n", "study key 'base': config file not found: "),
    ("base: base.yaml\nmethods: [naive]\n", "study key 'methods': Input should be a valid dictionary"),
    ("base: base.yaml\nmethods: {naive: []}\nseeds: 1000000000000\n",  # planned until memory ran out
     "study key 'seeds': Input should be less than or equal to 1000"),
    ("base: [\n", ":2: invalid YAML"),
    ("base: base.yaml\nmethods: {naive: []}\ngrid: {data.subset: [1, 2]}\nexclude: [{data.seed: 1}]\n",
     "study key 'exclude.0': 'data.seed' is not a grid axis"),
    ("base: base.yaml\nmethods: {naive: []}\ngrid: {data.subset: [1, 2]}\nexclude: [{data.subset: 3}]\n",
     "study key 'exclude.0': 3 is not a value of axis 'data.subset'"),
    ("base: base.yaml\nmethods: {naive: []}\ngrid: {data.subset: [1, 2]}\nexclude: [{}]\n",
     "study key 'exclude.0': an empty entry would leave out every cell"),
    ("base: base.yaml\nmethods: {naive: [data.seed=4]}\nseed_keys: [data.seed]\n",
     "study key 'seed_keys': 'data.seed' is set by the seed, so the method 'naive' may not set it"),
    ("base: base.yaml\nmethods: {naive: []}\nseed_keys: [train.seed]\n",
     "study key 'seed_keys': 'train.seed' is set by the study tool for every run"),
    ("base: base.yaml\nmethods: {naive: []}\ngrid: {optim.name: [adamw, sgd]}\ngrid_plot: {x: optim.name, y: [test]}\n",
     "study key 'grid_plot.x': axis 'optim.name' has non-numeric values"),
    ("base: base.yaml\nmethods: {naive: []}\ngrid_plot: {x: data.subset, y: [loss]}\n",
     "study key 'grid_plot.y': expected one of test, validation, "),
    ("base: base.yaml\nmethods: {naive: []}\ninterpolate: {naive: {of: naive, alphas: [0.5]}}\n",
     "study key 'interpolate.naive': the name must be a new method name"),
    ("base: base.yaml\nmethods: {naive: []}\ninterpolate: {wise: {of: lora, alphas: [0.5]}}\n",
     "study key 'interpolate.wise': 'of' must name a trained method of the study, got 'lora'"),
    ("base: base.yaml\nmethods: {naive: []}\ninterpolate: {wise: {of: naive, alphas: [0.5, 1.5]}}\n",
     "study key 'interpolate.wise.alphas': expected distinct numbers in [0, 1], got [0.5, 1.5]"),
    ("base: base.yaml\nmethods: {naive: []}\nsweep: {naive: {optim.lr: [1, 2]}}\nselect: acc\n"
     "interpolate: {wise: {of: naive, alphas: [0.5]}}\n",
     "study key 'interpolate.wise': 'at' must give a value for each sweep key of 'naive' (optim.lr), got none"),
    ("base: base.yaml\nmethods: {naive: []}\nsweep: {naive: {optim.lr: [1, 2]}}\nselect: acc\n"
     "interpolate: {wise: {of: naive, at: {optim.lr: 3}, alphas: [0.5]}}\n",
     "study key 'interpolate.wise': 'at.optim.lr': 3 is not a value of the sweep of 'naive'"),
    ("base: base.yaml\nmethods: {lora: []}\nsweep: {lora: {'trainable.lora.rank,trainable.lora.alpha': [[4, 8], 16]}}\n",
     "study key 'sweep': method 'lora': axis 'trainable.lora.rank,trainable.lora.alpha' moves 2 keys together: "
     "each value must be a list of 2 (one per key), got [[4, 8], 16]"),
    ("base: base.yaml\nmethods: {lora: [trainable.lora.alpha=8]}\n"
     "sweep: {lora: {'trainable.lora.rank,trainable.lora.alpha': [[4, 8], [16, 32]]}}\n",
     "study key 'sweep.lora': 'trainable.lora.alpha' is also set by the method's overrides"),
])
def test_bad_study_files_give_one_line_naming_the_key(tmp_path, text, message):
    path = write_study(tmp_path, text)
    with pytest.raises(TenureError) as caught:
        load_study(path)
    expected = f"{path}{message}" if message.startswith(":2:") else f"{path}: {message}"
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_plan_expands_cells_methods_and_seeds_with_exact_commands(tmp_path):
    path = write_study(tmp_path, """
base: base.yaml
seeds: 2
methods:
  naive: []
  ewc: [stages.1.ewc.lambda=100, optim.lr=1e-4]
grid:
  data.subset: [100, 1000]
  data.label_noise: [0.2]
""")
    study = load_study(path)
    runs = plan_runs(study, path, tmp_path / "out")
    assert len(runs) == 2 * 2 * 1 * 2
    assert [(r.cell.label, r.method, r.seed) for r in runs[:4]] == [
        ("data.subset=100, data.label_noise=0.2", "naive", 0), ("data.subset=100, data.label_noise=0.2", "naive", 1),
        ("data.subset=100, data.label_noise=0.2", "ewc", 0), ("data.subset=100, data.label_noise=0.2", "ewc", 1)]
    ewc = runs[3]
    assert ewc.run_dir == tmp_path / "out" / "data.subset-100__data.label_noise-0.2" / "ewc" / "seed1"
    # method overrides, then the grid cell (so a grid axis wins), then run_dir and seed
    assert ewc.command == (sys.executable, "-m", "tenure.engine.cli", "train", str(tmp_path / "base.yaml"),
                           "stages.1.ewc.lambda=100", "optim.lr=1e-4", "data.subset=100", "data.label_noise=0.2",
                           f"run_dir={ewc.run_dir}", "train.seed=1")
    assert ewc.name == "ewc seed 1 [data.subset=100, data.label_noise=0.2]"
    chosen = plan_runs(study, path, tmp_path / "out", methods=["ewc"], seeds=1)
    assert [(r.method, r.seed, r.cell.slug) for r in chosen] == [
        ("ewc", 0, "data.subset-100__data.label_noise-0.2"), ("ewc", 0, "data.subset-1000__data.label_noise-0.2")]
    with pytest.raises(TenureError, match="--methods: unknown method 'lora'; the study has naive, ewc"):
        plan_runs(study, path, tmp_path / "out", methods=["lora"])
    with pytest.raises(TenureError, match="^--methods: name at least one of the study's methods"):
        run_study(study_args(path, "--methods", " , ", "--out", str(tmp_path / "none")))  # not "all of them"
    assert not (tmp_path / "none").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(TenureError, match=f"^--out {tmp_path / 'a_file'}: that is a file; give a directory$"):
        run_study(study_args(path, "--out", str(tmp_path / "a_file")))
    plain = plan_runs(load_study(write_study(tmp_path, "base: base.yaml\nmethods: {naive: []}\n", "p.yaml")),
                      tmp_path / "p.yaml", tmp_path / "o2")
    assert [(r.run_dir.relative_to(tmp_path), r.name) for r in plain] == [
        (pathlib.Path(f"o2/base/naive/seed{k}"), f"naive seed {k}") for k in range(5)]  # 5 seeds by default


def test_a_tied_sweep_axis_moves_its_keys_together(tmp_path):
    """'rank,alpha': [[4, 8], [16, 32]] is two points (not four), each setting both keys, and an
    interpolation names its source point by the tied axis."""
    path = write_study(tmp_path, """
base: base.yaml
seeds: 1
methods: {naive: [], lora: [optim.lr=1e-3]}
sweep: {lora: {"trainable.lora.rank,trainable.lora.alpha": [[4, 8], [16, 1.6e1]], optim.warmup_ratio: [0, 0.1]}}
interpolate: {wise: {of: lora, at: {"trainable.lora.rank,trainable.lora.alpha": [16, 16], optim.warmup_ratio: 0}, alphas: [0.5]}}
""")
    runs = [r for r in plan_runs(load_study(path), path, tmp_path / "out") if r.method != "naive"]
    assert [r.variant for r in runs] == [
        "lora[trainable.lora.rank=4, trainable.lora.alpha=8, optim.warmup_ratio=0]",
        "lora[trainable.lora.rank=4, trainable.lora.alpha=8, optim.warmup_ratio=0.1]",
        "lora[trainable.lora.rank=16, trainable.lora.alpha=16, optim.warmup_ratio=0]",
        "lora[trainable.lora.rank=16, trainable.lora.alpha=16, optim.warmup_ratio=0.1]",
        "wise[alpha=0.5]"]
    assert runs[1].command[-5:-2] == ("trainable.lora.rank=4", "trainable.lora.alpha=8", "optim.warmup_ratio=0.1")
    assert runs[1].run_dir.parent.name == "trainable.lora.rank-4__trainable.lora.alpha-8__optim.warmup_ratio-0.1"
    assert runs[4].source.run_dir == runs[2].run_dir


def test_methods_that_differ_only_after_stage_a_share_one_stage_a_run(tmp_path):
    from tenure.engine.study.config import share_first_stage
    data = {"train": "train.jsonl", "labels": ["x", "y"]}
    base = {"model": {"path": "some/model"}, "tasks": {"A": {"kind": "seq_cls", "data": data},
                                                       "B": {"kind": "seq_cls", "data": data}},
            "stages": [{"tasks": ["A"], "steps": 4}, {"tasks": ["B"], "steps": 4}]}
    path = write_study(tmp_path, "base: base.yaml\nseeds: 2\nmethods:\n  naive: []\n  ewc: [ewc.lambda=100]\n"
                                 "  replay: [replay.ratio=0.25]\n  l2sp: [l2sp.alpha=1.0]\n")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    first, runs = share_first_stage(runs, tmp_path / "out")
    assert [(r.method, r.seed, r.run_dir.relative_to(tmp_path)) for r in first] == [
        ("naive", k, pathlib.Path(f"out/base/first_stage/naive/seed{k}")) for k in (0, 1)]
    assert first[0].command[-1] == 'stages=[{"tasks": ["A"], "steps": 4}]'
    assert f"run_dir={first[0].run_dir}" in first[0].command and "train.seed=0" in first[0].command
    branch = {(r.method, r.seed): next((c for c in r.command if c.startswith("branch_from=")), None) for r in runs}
    for seed in (0, 1):
        for method in ("naive", "ewc", "replay"):  # EWC and replay act only from stage B on
            assert branch[method, seed] == f"branch_from={first[seed].run_dir}"
        assert branch["l2sp", seed] is None  # L2-SP pulls stage A's weights too
    # `--methods ewc` alone: ewc still branches from naive's first stage (it trained it again elsewhere,
    # and a lone ewc did not branch at all)
    only_ewc = plan_runs(load_study(path), path, tmp_path / "out", methods=["ewc"])
    again, only_ewc = share_first_stage(only_ewc, tmp_path / "out", plan_runs(load_study(path), path, tmp_path / "out"))
    assert [r.run_dir for r in again] == [r.run_dir for r in first]
    assert [c for r in only_ewc for c in r.command if c.startswith("branch_from=")] == [
        f"branch_from={r.run_dir}" for r in first]
    one_stage = {**base, "stages": base["stages"][:1]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(one_stage))
    assert share_first_stage(plan_runs(load_study(path), path, tmp_path / "o2"), tmp_path / "o2")[0] == []


def test_a_point_two_sweeps_share_is_trained_once_and_read_by_both(tmp_path, capsys):
    """LoRA's rank 16 at lr 1e-3 sits on the lr curve and on the rank curve: one run per seed, its
    results read by both variants; an interpolation of the second reads the first's weights."""
    from tenure.engine.study.config import reuse_equal_runs
    path = write_study(tmp_path, """
base: base.yaml
seeds: 2
methods:
  lora: ["trainable={mode: lora, lora: {rank: 16, alpha: 32}}"]
  lora_rank: ["trainable={mode: lora}", optim.lr=1.0e-3]
sweep:
  lora: {optim.lr: [3.0e-4, 1.0e-3]}
  lora_rank: {"trainable.lora.rank,trainable.lora.alpha": [[4, 8], [16, 32]]}
interpolate: {wise: {of: lora_rank, at: {"trainable.lora.rank,trainable.lora.alpha": [16, 32]}, alphas: [0.5]}}
""")
    runs = reuse_equal_runs(plan_runs(load_study(path), path, tmp_path / "out"))
    twins = {(r.variant, r.seed): r.same_as for r in runs if r.same_as is not None}
    lead = {k: next(r for r in runs if r.variant == "lora[optim.lr=0.001]" and r.seed == k) for k in (0, 1)}
    assert twins == {("lora_rank[trainable.lora.rank=16, trainable.lora.alpha=32]", k): lead[k] for k in (0, 1)}
    twin = next(r for r in runs if r.same_as is lead[1])
    assert twin.result == lead[1].run_dir / "forgetting.json" and twin.run_dir != lead[1].run_dir
    wise = [r for r in runs if r.method == "wise"]
    assert [(w.source, w.command[4]) for w in wise] == [(lead[k], str(lead[k].run_dir)) for k in (0, 1)]
    # Aggregated, the twin's row holds the lead's values (written here in the engine's format).
    for run in runs:
        if run.source is None and run.same_as is None:
            run.run_dir.mkdir(parents=True)
            final = 0.5 + 0.1 * run.seed + (0.2 if "0.001" in run.variant else 0.0)
            run.result.write_text(json.dumps(record([[0.8, 0.1], [final, 0.7]], START)))
    assert run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out"))) == 1  # wise not run
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "study.json").read_text())["cells"][0]["rows"]}
    assert rows["lora_rank[trainable.lora.rank=16, trainable.lora.alpha=32]"]["per_seed"]["final/A"] == \
        rows["lora[optim.lr=0.001]"]["per_seed"]["final/A"] == pytest.approx([0.7, 0.8])
    assert capsys.readouterr().out.startswith("10 runs: 8 finished, 2 not (--aggregate-only)")
    # A twin that finished in its own directory (a study run before with --methods lora_rank) leads.
    lead[1].result.unlink()
    (twin.run_dir).mkdir(parents=True)
    (twin.run_dir / "forgetting.json").write_text(json.dumps(record([[0.8, 0.1], [0.3, 0.7]], START)))
    runs = reuse_equal_runs(plan_runs(load_study(path), path, tmp_path / "out"))
    by_seed = {r.seed: r for r in runs if r.variant == "lora[optim.lr=0.001]"}
    assert by_seed[1].same_as.run_dir == twin.run_dir and by_seed[0].same_as is None


def test_exclude_leaves_cells_out_and_seed_keys_take_the_seed(tmp_path):
    path = write_study(tmp_path, """
base: base.yaml
seeds: 2
methods: {full: []}
grid:
  data.subset: [100, 8000]
  data.augment.copies: [0, 4]
exclude:
  - {data.subset: 8000, data.augment.copies: 4}
seed_keys: [data.seed]
""")
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    assert [r.cell.label for r in runs[::2]] == ["data.subset=100, data.augment.copies=0",
                                                 "data.subset=100, data.augment.copies=4",
                                                 "data.subset=8000, data.augment.copies=0"]
    assert runs[1].command[-3:] == (f"run_dir={runs[1].run_dir}", "train.seed=1", "data.seed=1")
    everything = write_study(tmp_path, "base: base.yaml\nmethods: {a: []}\ngrid: {data.subset: [1]}\n"
                                       "exclude: [{data.subset: 1}]\n", "all.yaml")
    with pytest.raises(TenureError, match="study key 'exclude': leaves no cell to run"):
        plan_runs(load_study(everything), everything, tmp_path / "o")


@pytest.mark.parametrize("value", [100, 0.2, 1e-4, True, None, "cosine", "null", "1e-3", "", [1, 2],
                                   {"task": "A", "max_drop": 0.02}, "a: b"])
def test_grid_values_reach_the_engine_as_the_same_yaml_value(value):
    key, _, raw = format_override("x.y", value).partition("=")
    assert key == "x.y"
    assert (yaml.safe_load(raw) if raw else "") == value


# ---------------------------------------------------------------- the runner

FAKE_TRAIN = """
import json, pathlib, sys
run_dir = pathlib.Path(sys.argv[1]); code = int(sys.argv[2])
(run_dir / "ran").write_text("yes")
(run_dir / "checkpoints" / "4").mkdir(parents=True)
print("training", run_dir.name, flush=True)
if code == 0:
    (run_dir / "summary.json").write_text(json.dumps({"checkpoints": "checkpoints"}))
    (run_dir / "forgetting.json").write_text(json.dumps({"tasks": ["A"]}))
sys.exit(code)
"""


def fake_run(tmp_path, name, code=0):
    run_dir = tmp_path / name
    return Run(name, Cell(()), 0, run_dir, (sys.executable, "-c", FAKE_TRAIN, str(run_dir), str(code)))


def test_runner_skips_finished_runs_reports_failures_and_goes_on(tmp_path, capsys):
    finished, todo, broken, late = (fake_run(tmp_path, n, c) for n, c in
                                    (("finished", 0), ("todo", 0), ("broken", 3), ("late", 0)))
    finished.run_dir.mkdir()
    (finished.result).write_text("{}")
    outcome = run_all([finished, todo, broken, late], jobs=2, stream=sys.stdout)
    out = capsys.readouterr().out
    assert [r.method for r in outcome.skipped] == ["finished"]
    assert [r.method for r in outcome.done] == ["todo", "late"]
    assert [(r.method, reason) for r, reason in outcome.failed] == [
        ("broken", f"exit code 3; log: {broken.run_dir / 'study.log'}")]
    assert not (finished.run_dir / "ran").exists()
    assert all((r.run_dir / "ran").read_text() == "yes" for r in (todo, broken, late))
    assert out.splitlines()[0] == "4 runs: 1 already done, 3 to run, 2 at a time"
    progress = sorted(line.split("]")[0] + "]" for line in out.splitlines()[1:])
    assert progress == ["[2/4]", "[3/4]", "[4/4]"]
    assert "broken seed 0: FAILED in" in out and "(exit code 3; log: " in out
    log = (broken.run_dir / "study.log").read_text()
    assert log.startswith("=== ") and "training broken" in log
    recorded = json.loads((todo.run_dir / "study_run.json").read_text())
    assert recorded["command"] == list(todo.command[1:]) and recorded["seed"] == 0
    # Rerun: only the failed one runs again (resume), and it still fails.
    again = run_all([finished, todo, broken, late], jobs=1, stream=sys.stdout)
    assert [r.method for r in again.skipped] == ["finished", "todo", "late"]
    assert [r.method for r, _ in again.failed] == ["broken"]
    assert (broken.run_dir / "study.log").read_text().count("=== ") == 2


def test_prune_deletes_the_weights_of_finished_runs_only(tmp_path):
    """study key keep_checkpoints: false: a run that finished loses its checkpoints and HF export
    (nothing resumes it); one the study keeps (a branch source) and one that failed (it resumes)
    keep theirs."""
    pruned, kept, broken = (fake_run(tmp_path, n, c) for n, c in (("pruned", 0), ("kept", 0), ("broken", 3)))
    for run in (pruned, kept):
        (run.run_dir / "hf").mkdir(parents=True)
        (run.run_dir / "hf" / "model.safetensors").write_bytes(b"weights")
    outcome = run_all([pruned, kept, broken], jobs=1, stream=io.StringIO(), prune=lambda run: run.method != "kept")
    assert [r.method for r in outcome.done] == ["pruned", "kept"]
    assert not (pruned.run_dir / "checkpoints").exists() and pruned.result.is_file()
    assert not (pruned.run_dir / "hf").exists() and (kept.run_dir / "hf" / "model.safetensors").is_file()
    assert (kept.run_dir / "checkpoints" / "4").is_dir() and (broken.run_dir / "checkpoints" / "4").is_dir()


def test_a_run_dir_made_by_another_command_is_refused(tmp_path):
    run = fake_run(tmp_path, "r")
    run_all([run], stream=open(os.devnull, "w"))
    changed = Run("r", Cell(()), 0, run.run_dir, (*run.command, "optim.lr=1"))
    with pytest.raises(TenureError, match=r"r: made by another command .*study_run.json.*Remove that run dir"):
        check_resumable([changed])
    check_resumable([run])
    # Which shared first stage a run branches from follows the invocation's --methods (it was refused,
    # so `--methods ewc` after a whole study could only delete finished runs): not a change of command.
    check_resumable([Run("r", Cell(()), 0, run.run_dir, (*run.command, "branch_from=/out/base/first_stage/naive"))])


def test_a_run_that_exits_0_without_forgetting_json_fails(tmp_path):
    run = Run("quiet", Cell(()), 0, tmp_path / "q", (sys.executable, "-c", "print('no result')"))
    outcome = run_all([run], stream=open(os.devnull, "w"))
    assert outcome.failed == [(run, f"exited 0 but wrote no forgetting.json; log: {tmp_path / 'q' / 'study.log'}")]


STUDY_THAT_HANGS = """
import pathlib, sys
from tenure.engine.study.config import Cell, Run
from tenure.engine.study.runner import run_all
out = pathlib.Path(sys.argv[1])
hang = "import os, pathlib, time; pathlib.Path(r'{}', str(os.getpid())).touch(); time.sleep(120)".format(out)
runs = [Run(f"r{i}", Cell(()), 0, out / f"r{i}", (sys.executable, "-c", hang)) for i in range(3)]
try:
    run_all(runs, jobs=2)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_sigterm_to_the_study_stops_its_runs(tmp_path):
    study = subprocess.Popen([sys.executable, "-c", STUDY_THAT_HANGS, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    while len([p for p in tmp_path.iterdir() if p.name.isdigit()]) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    children = [int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()]
    assert len(children) == 2  # two at a time; the third waits
    study.terminate()
    out, _ = study.communicate(timeout=30)
    assert out.splitlines()[-1] == "interrupted"
    assert out.count("stopped with the study; log: ") == 2 and "r2" not in out
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "r2").exists()


def test_thread_env_splits_the_cores_and_xla_accepts_it():
    base = {"XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=true", "PATH": "/bin"}
    env = thread_env(4, cores=8, base=base)
    assert env["XLA_FLAGS"] == ("--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=2")
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "2"
    assert env["PATH"] == "/bin"
    assert thread_env(3, cores=2, base={})["OMP_NUM_THREADS"] == "1"
    assert thread_env(1, cores=2, base=base) == base
    # XLA aborts on flags it does not know; these it must take.
    result = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float((jnp.ones((8, 8)) @ "
                             "jnp.ones((8, 8))).sum()))"], env=thread_env(2, cores=2), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "512.0"


# ---------------------------------------------------------------- tables and plots

# Per method, three seeds of a two-task run (R[stage][task]) from one starting model.
START = [0.10, 0.05]
RUNS = {
    "naive": [[[0.80, 0.20], [0.30, 0.90]], [[0.82, 0.22], [0.40, 0.92]], [[0.84, 0.18], [0.50, 0.88]]],
    "replay": [[[0.80, 0.20], [0.70, 0.85]], [[0.80, 0.20], [0.72, 0.85]], [[0.80, 0.20], [0.74, 0.85]]],
}


@pytest.fixture
def finished_study(tmp_path):
    path = write_study(tmp_path, "base: base.yaml\nseeds: 3\nmethods: {naive: [], replay: [replay.ratio=0.2]}\n")
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    for run in runs:
        R = RUNS[run.method][run.seed]
        run.run_dir.mkdir(parents=True)
        dip = {("A", 1): 0.15 + 0.05 * run.seed} if run.method == "naive" else {}
        curve = lambda i, t: dip.get((t, i), R[i]["AB".index(t)])  # noqa: E731 (stability gap in stage B)
        run.result.write_text(json.dumps(record(R, START, curve=curve)))
    return path, runs


def study_args(path, *extra):
    parser = argparse.ArgumentParser(prog="tenure")
    add_study_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["study", str(path), *extra])


def test_tables_hold_mean_interval_and_standard_error_over_seeds(finished_study, tmp_path, capsys):
    path, runs = finished_study
    assert run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out"))) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    document = json.loads((out / "study.json").read_text())
    (table,) = document["cells"]
    assert table["tasks"] == ["A", "B"] and table["label"] == "base"
    naive, replay = table["rows"]
    assert naive["method"] == "naive" and naive["seeds"] == [0, 1, 2]
    se = 0.1 / math.sqrt(3)  # std (ddof 1) of 0.3, 0.4, 0.5 is 0.1
    assert naive["mean"]["final/A"] == pytest.approx(0.4) and naive["se"]["final/A"] == pytest.approx(se)
    assert naive["mean"]["final/B"] == pytest.approx(0.9) and naive["se"]["final/B"] == pytest.approx(0.02 / math.sqrt(3))
    # forgetting of A: 0.8-0.3, 0.82-0.4, 0.84-0.5 = 0.5, 0.42, 0.34 (max-based = first-based with 2 stages)
    assert naive["mean"]["forgetting_max"] == pytest.approx(0.42)
    assert naive["se"]["forgetting_max"] == pytest.approx(0.08 / math.sqrt(3))
    assert naive["mean"]["forgetting_first"] == pytest.approx(0.42)
    assert naive["mean"]["bwt"] == pytest.approx(-0.42)
    assert naive["mean"]["acc"] == pytest.approx(np.mean([0.6, 0.66, 0.69]))
    assert naive["mean"]["fwt"] == pytest.approx(np.mean([0.15, 0.17, 0.13]))  # R[0,B] - start B
    assert naive["mean"]["learning_newest"] == pytest.approx(0.9)
    assert naive["mean"]["learning_diag"] == pytest.approx(np.mean([0.85, 0.87, 0.86]))
    assert replay["mean"]["forgetting_max"] == pytest.approx(0.08) and replay["se"]["forgetting_max"] == pytest.approx(
        0.02 / math.sqrt(3))
    assert replay["se"]["learning_newest"] == pytest.approx(0.0)
    assert replay["per_seed"]["final/A"] == pytest.approx([0.70, 0.72, 0.74])
    # Markdown: printed and written, one row per method, mean [95% CI] (the interval itself is
    # tested in tests/test_study_aggregate.py; here, that each cell shows it).
    md = (out / "study.md").read_text()
    header = ("| method | seeds | A accuracy (final) ↑ | B accuracy (final) ↑ | ACC | BWT | FWT | forgetting (max) | "
              "forgetting (first) | learning (newest task) | learning (mean of diagonal) |")
    assert header in md and header in printed
    naive_line = next(line for line in md.splitlines() if line.startswith("| naive "))
    keys = ["final/A", "final/B", "acc", "bwt", "fwt", "forgetting_max", "forgetting_first", "learning_newest",
            "learning_diag"]
    cis = [mean_ci(np.array(naive["per_seed"][k])) for k in keys]
    assert naive_line == "| naive | 3 | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi, _ in cis) + " |"
    assert naive_line.startswith("| naive | 3 | 0.400 [0.300, 0.500] | 0.900 [")  # resamples of 0.3, 0.4, 0.5
    assert naive["ci"]["final/A"] == pytest.approx([cis[0][1], cis[0][2]])
    assert naive_line in printed
    # CSV: one row per (cell, method), mean, se and the interval per column.
    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["naive", "replay"] and rows[0]["seeds"] == "3"
    assert float(rows[0]["final/A_mean"]) == pytest.approx(0.4)
    assert float(rows[0]["final/A_se"]) == pytest.approx(se)
    assert float(rows[0]["final/A_lo"]) == pytest.approx(cis[0][1])
    assert float(rows[0]["final/A_hi"]) == pytest.approx(cis[0][2])
    assert float(rows[1]["forgetting_max_mean"]) == pytest.approx(0.08)
    for name in ("tradeoff.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000


def test_partial_seeds_grid_cells_and_missing_runs(tmp_path, capsys):
    path = write_study(tmp_path, "base: base.yaml\nseeds: 2\nmethods: {naive: [], lora: [lora.rank=4]}\n"
                                 "grid: {data.subset: [100, 1000]}\n")
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    for run in runs:
        if run.method == "lora" and (run.seed == 1 or run.cell.values[0][1] == 1000):
            continue  # unfinished
        run.run_dir.mkdir(parents=True)
        k = run.seed + (10 if run.cell.values[0][1] == 1000 else 0)
        run.result.write_text(json.dumps(record([[0.5 + k / 100, 0.1], [0.2, 0.7]], START)))
    assert run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out"))) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("8 runs: 5 finished, 3 not (--aggregate-only)")
    tables = json.loads((tmp_path / "out" / "study.json").read_text())["cells"]
    assert [t["cell"] for t in tables] == [{"data.subset": 100}, {"data.subset": 1000}]
    assert [[(r["method"], r["seeds"]) for r in t["rows"]] for t in tables] == [
        [("naive", [0, 1]), ("lora", [0])], [("naive", [0, 1])]]
    lora = tables[0]["rows"][1]
    assert lora["mean"]["forgetting_max"] == pytest.approx(0.3) and lora["se"]["forgetting_max"] is None
    assert lora["n"]["forgetting_max"] == 1
    assert tables[1]["rows"][0]["mean"]["final/A"] == pytest.approx(0.2)
    assert tables[1]["rows"][0]["mean"]["forgetting_max"] == pytest.approx(np.mean([0.4, 0.41]))
    md = (tmp_path / "out" / "study.md").read_text()
    assert "## data.subset=100" in md and "## data.subset=1000" in md
    assert "| lora | 1 | 0.200 | 0.700 |" in md  # n = 1: no interval
    with open(tmp_path / "out" / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["data.subset"], r["method"]) for r in rows] == [("100", "naive"), ("100", "lora"), ("1000", "naive")]
    assert rows[1]["forgetting_max_se"] == ""
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["curves-data.subset-100.png", "curves-data.subset-1000.png", "grid.png",
                     "tradeoff-data.subset-100.png", "tradeoff-data.subset-1000.png"]


def summary(final, best_step, gaps, early_stop=None, overfit=()):
    """A summary.json as `tenure train` writes it (the keys a single-task table reads); `gaps`:
    step -> validation/generalization_gap of each validation eval."""
    evals = [{"step": step, "stage": 0, "validation/accuracy": 0.5, "validation/loss": 1.0 + gap,
              "validation/generalization_gap": gap} for step, gap in gaps.items()]
    return {"baseline": {}, "final": final, "train_loss": [2.0], "best_step": best_step, "evals": evals,
            "stage_ends": [max(gaps)], "early_stops": [] if early_stop is None else [{"step": early_stop, "stage": 0}],
            "overfit_warnings": [{"step": s, "stage": 0} for s in overfit], "R": [[final["test/accuracy"]]]}


# Three seeds of a plain fine-tune per data size: (test acc, validation acc, best step, eval gaps,
# early stop step, overfit warning steps).
SINGLE_RUNS = {
    100: [(0.40, 0.42, 40, {20: 0.1, 40: 0.5, 60: 0.9, 80: 1.1}, 80, [60, 80]),
          (0.44, 0.46, 60, {20: 0.1, 40: 0.4, 60: 0.8, 80: 1.0}, None, [80]),
          (0.42, 0.44, 40, {20: 0.2, 40: 0.6, 60: 1.0}, 60, [])],
    1000: [(0.60, 0.61, 80, {20: 0.0, 40: 0.05, 60: 0.1, 80: 0.15}, None, []),
           (0.62, 0.63, 80, {20: 0.0, 40: 0.05, 60: 0.1, 80: 0.25}, None, []),
           (0.64, 0.62, 60, {20: 0.0, 40: 0.05, 60: 0.1, 80: 0.2}, None, [])],
}


def test_single_task_runs_get_scores_gap_and_monitor_columns(tmp_path, capsys):
    """One stage, one task (a plain fine-tune): the table reads each run's summary.json, the
    loss gap the overfitting monitor logged, and whether early stopping / the monitor fired."""
    path = write_study(tmp_path, "base: base.yaml\nseeds: 3\nmethods: {full: []}\n"
                                 "grid: {data.subset: [100, 1000], data.label_noise: [0.2]}\n")
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    for run in runs:
        test, val, best, gaps, stop, overfit = SINGLE_RUNS[run.cell.values[0][1]][run.seed]
        run.run_dir.mkdir(parents=True)
        run.result.write_text(json.dumps(record([[test]], [0.06], tasks=("task",), steps_per_stage=max(gaps))))
        final = {"validation/accuracy": val, "validation/loss": 1.5, "test/accuracy": test, "test/loss": 1.6}
        run.summary.write_text(json.dumps(summary(final, best, gaps, stop, overfit)))
    assert run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out"))) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    small, large = json.loads((out / "study.json").read_text())["cells"]
    assert small["kind"] == large["kind"] == "single_task"
    assert [c["key"] for c in small["columns"]] == ["test", "validation", "gap_best", "gap_last", "best_step",
                                                   "early_stop", "early_stop_step", "overfit", "overfit_step"]
    row = small["rows"][0]
    assert row["per_seed"]["test"] == pytest.approx([0.40, 0.44, 0.42])
    assert row["mean"]["test"] == pytest.approx(0.42) and row["se"]["test"] == pytest.approx(0.02 / math.sqrt(3))
    assert row["mean"]["validation"] == pytest.approx(0.44)
    assert row["per_seed"]["gap_best"] == pytest.approx([0.5, 0.8, 0.6])       # the eval at each best step
    assert row["per_seed"]["gap_last"] == pytest.approx([1.1, 1.0, 1.0])       # the run's last eval
    assert row["mean"]["best_step"] == pytest.approx(140 / 3)
    assert row["per_seed"]["early_stop"] == [1.0, 0.0, 1.0] and row["mean"]["early_stop_step"] == pytest.approx(70)
    assert row["n"]["early_stop_step"] == 2                                    # over the seeds that stopped
    assert row["per_seed"]["overfit"] == [1.0, 1.0, 0.0] and row["mean"]["overfit_step"] == pytest.approx(70)
    big = large["rows"][0]
    assert big["mean"]["gap_last"] == pytest.approx(0.2) and big["mean"]["early_stop"] == 0.0
    assert big["n"]["early_stop_step"] == 0 and big["mean"]["overfit_step"] is None
    # One Markdown table for the grid: a row per cell, the axes first; counts as fired / seeds.
    md = (out / "study.md").read_text()
    header = ("| subset | label_noise | method | seeds | test accuracy ↑ | validation accuracy ↑ | loss gap at best step | "
              "loss gap at last eval | best step | early stop fired | early stop step | overfit warning fired | "
              "first overfit warning |")
    assert header in md and header in printed and "ACC" not in md and "##" not in md
    def shown(values, digits=3):
        mean, lo, hi, _ = mean_ci(np.array(values, dtype=np.float64))
        return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    per_seed = row["per_seed"]
    line = (f"| 100 | 0.2 | full | 3 | {shown(per_seed['test'])} | {shown(per_seed['validation'])} | "
            f"{shown(per_seed['gap_best'])} | {shown(per_seed['gap_last'])} | {shown(per_seed['best_step'])} | "
            f"2/3 | {shown([80.0, 60.0])} | 2/3 | {shown([60.0, 80.0])} |")
    assert line.startswith("| 100 | 0.2 | full | 3 | 0.420 [0.400, 0.440] | 0.440 [0.420, 0.460] |")
    assert line in md and line in printed
    assert "| 1000 | 0.2 | full | 3 | 0.620 [0.600, 0.640] |" in md and "| 0/3 | — | 0/3 | — |" in md
    assert "validation/generalization_gap" in md                                 # the notes say what the gap is
    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["data.subset"] for r in rows] == ["100", "1000"] and float(rows[0]["early_stop_mean"]) == pytest.approx(2 / 3)
    names = {p.name for p in out.glob("*.png")}  # no Pareto plot: a single task forgets nothing
    assert names == {"curves-data.subset-100__data.label_noise-0.2.png", "curves-data.subset-1000__data.label_noise-0.2.png",
                     "grid.png"}
    assert (out / "grid.png").stat().st_size > 10_000


def test_a_single_task_run_without_its_summary_is_an_error(tmp_path):
    path = write_study(tmp_path, "base: base.yaml\nseeds: 1\nmethods: {full: []}\n")
    (run,) = plan_runs(load_study(path), path, tmp_path / "out")
    run.run_dir.mkdir(parents=True)
    run.result.write_text(json.dumps(record([[0.5]], [0.06], tasks=("task",))))
    with pytest.raises(TenureError, match="summary.json: missing"):
        run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out")))
    run.summary.write_text(json.dumps({"final": {}, "best_step": 3}))  # written before the monitors were recorded
    with pytest.raises(TenureError, match="summary.json: key 'evals': Field required"):
        run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out")))


def test_mean_se_ignores_nan():
    assert mean_se([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(1.0), 2)
    mean, se, n = mean_se([float("nan")])
    assert math.isnan(mean) and math.isnan(se) and n == 0


def test_no_finished_run_is_an_error(tmp_path):
    path = write_study(tmp_path, "base: base.yaml\nmethods: {naive: []}\n")
    with pytest.raises(TenureError, match="no run finished, nothing to tabulate"):
        run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out")))


def test_an_evaluation_only_task_gets_its_change_from_start(tmp_path):
    """One stage trains 'lexnames'; 'general' (e.g. embedding quality) is only evaluated: R is 1 x 2,
    the engine writes no summary (R is not square) and may write start_row as given."""
    path = write_study(tmp_path, "base: base.yaml\nseeds: 2\nmethods: {full: [], lora: [lora.rank=4]}\n"
                                 "tradeoff: {learning: final/lexnames, forgetting: drop/general}\n")
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    finals = {("full", 0): 0.70, ("full", 1): 0.60, ("lora", 0): 0.78, ("lora", 1): 0.80}
    for run in runs:
        run.run_dir.mkdir(parents=True)
        rec = record([[0.9, 0]], [0.1, 0.8], tasks=("lexnames", "general"), stages=("lexnames",))
        rec["R"][0][1] = finals[run.method, run.seed]
        run.result.write_text(json.dumps(rec))
    assert run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out"))) == 0
    (table,) = json.loads((tmp_path / "out" / "study.json").read_text())["cells"]
    assert [c["key"] for c in table["columns"]][:3] == ["final/lexnames", "final/general", "change/general"]
    full, lora = table["rows"]
    assert full["mean"]["change/general"] == pytest.approx(-0.15) and full["se"]["change/general"] == pytest.approx(0.05)
    assert lora["mean"]["change/general"] == pytest.approx(-0.01)
    assert full["mean"]["drop/general"] == pytest.approx(0.15)  # higher is better, so a fall is a drop > 0
    assert full["mean"]["learning_newest"] == pytest.approx(0.9) and full["mean"]["learning_diag"] == pytest.approx(0.9)
    assert full["mean"]["acc"] is None and full["mean"]["forgetting_max"] is None
    assert "general change from start ↑" in (tmp_path / "out" / "study.md").read_text()
    (runs[0].result).write_text(json.dumps({**rec, "R": [[0.9]]}))
    with pytest.raises(TenureError, match=r"R must be \[stages\]\[2 tasks\], got shape \(1, 1\)"):
        run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out")))


def test_forgetting_against_kl_and_weight_distance_is_correlated_across_the_runs(tmp_path):
    """Runs with eval.kl_to_start: the table reports Pearson and Spearman of the forgetting figure
    against the last stage's KL (mean over its trained tasks) and against the weight distance."""
    path = write_study(tmp_path, "base: base.yaml\nseeds: 2\nmethods: {full: [], lora: [lora.rank=4]}\n"
                                 "tradeoff: {learning: final/lexnames, forgetting: drop/general}\n")
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    drop = {("full", 0): 0.10, ("full", 1): 0.20, ("lora", 0): 0.02, ("lora", 1): 0.00}
    kl = {("full", 0): 0.31, ("full", 1): 0.35, ("lora", 0): 0.12, ("lora", 1): 0.05}
    distance = {("full", 0): 1.0, ("full", 1): 3.0, ("lora", 0): 4.0, ("lora", 1): 2.0}
    for run in runs:
        run.run_dir.mkdir(parents=True)
        key = run.method, run.seed
        rec = record([[0.9, 0.8 - drop[key]]], [0.1, 0.8], tasks=("lexnames", "general"), stages=("lexnames",))
        run.result.write_text(json.dumps({**rec, "kl_to_start": [{"lexnames": kl[key]}],
                                          "weight_distance": [distance[key]]}))
    assert run_study(study_args(path, "--aggregate-only", "--out", str(tmp_path / "out"))) == 0
    (table,) = json.loads((tmp_path / "out" / "study.json").read_text())["cells"]
    y = np.array([drop[k] for k in drop])
    for name, x in (("kl_to_start", kl), ("weight_distance", distance)):
        x = np.array([x[k] for k in drop])
        ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731  (no ties here)
        assert table["predictors"][name] == {"pearson": pytest.approx(np.corrcoef(x, y)[0, 1]),
                                             "spearman": pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1]),
                                             "n": 4}
    assert table["predictors"]["kl_to_start"]["spearman"] == pytest.approx(1.0)
    assert table["predictors"]["weight_distance"]["spearman"] == pytest.approx(0.0, abs=1e-12)  # ranks 0,2,3,1 vs 2,3,1,0
    text = (tmp_path / "out" / "study.md").read_text()
    assert "| KL to the starting model | " in text and "| distance to the starting weights | " in text


# ---------------------------------------------------------------- end to end, real engine

TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"
SPLIT = {"A": ["noun.animal", "noun.plant", "noun.food", "noun.body"],
         "B": ["noun.artifact", "noun.act", "noun.person", "noun.location"]}


@pytest.fixture(scope="module")
def tiny_sweep_study(tmp_path_factory):
    """naive vs replay swept over two ratios, on lexnames split in two 4-class tasks, tiny BERT
    fixture, two seeds, two runs at once, the points chosen on validation ACC; then one run's
    result removed (a killed grid) and the study run again. Run once for the module."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    for split, n in (("train", 64), ("validation", 16), ("test", 16)):
        rows = [json.loads(line) for line in open(ROOT / f"data/wordnet_lexnames/{split}.jsonl")]
        for task, labels in SPLIT.items():
            keep = [r for r in rows if r["label"] in labels][:n]
            (tmp_path / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    task = lambda t: {"kind": "seq_cls", "data": {  # noqa: E731
        "format": "text_label", "train": str(tmp_path / f"{t}_train.jsonl"), "max_length": 32,
        "validation": str(tmp_path / f"{t}_validation.jsonl"), "test": str(tmp_path / f"{t}_test.jsonl"),
        "batch_size": 8, "eval_batch_size": 16}}
    base = {"model": {"path": str(TINY_BERT)}, "tasks": {"A": task("A"), "B": task("B")},
            "stages": [{"tasks": ["A"], "steps": 4}, {"tasks": ["B"], "steps": 4}],
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0},
            "train": {"eval_every": 2, "log_every": 2}, "checkpoint": {"every_steps": 100},
            "logging": {"progress": False, "tensorboard": False}}
    study = write_study(tmp_path, "base: base.yaml\nseeds: 2\nselect: acc\nkeep_checkpoints: false\nmethods:\n"
                                  "  naive: []\n  replay: []\nsweep:\n  replay: {stages.1.replay.ratio: [0.25, 0.5]}\n")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))  # write_study wrote a placeholder base
    out = tmp_path / "out"
    assert run_study(study_args(study, "--out", str(out), "--jobs", "2")) == 0
    killed = out / "base" / "replay" / "stages.1.replay.ratio-0.5" / "seed1" / "forgetting.json"
    killed.unlink()  # as if the study had been stopped before this run wrote its result
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_study(study_args(study, "--out", str(out)))
    return study, out, code, printed.getvalue()


@pytest.mark.slow
def test_a_swept_study_runs_every_point_from_one_stage_a_and_resumes(tiny_sweep_study):
    """The table holds exactly what the runs' forgetting.json say; every point branches from one
    stage A per seed; the rerun after a kill runs only the unfinished run."""
    study, out, code, printed = tiny_sweep_study
    assert code == 0
    first = {k: out / "base" / "first_stage" / "naive" / f"seed{k}" for k in (0, 1)}
    (table,) = json.loads((out / "study.json").read_text())["cells"]
    assert [r["variant"] for r in table["rows"]] == ["naive", "replay[stages.1.replay.ratio=0.25]",
                                                     "replay[stages.1.replay.ratio=0.5]"]
    for row in table["rows"]:
        point = row["variant"].partition("=")[2].rstrip("]")
        run_dirs = [out / "base" / row["method"] / (f"stages.1.replay.ratio-{point}" if point else "") / f"seed{k}"
                    for k in (0, 1)]
        records = [json.loads((d / "forgetting.json").read_text()) for d in run_dirs]
        assert row["seeds"] == [0, 1]
        assert row["per_seed"]["final/A"] == [r["R"][1][0] for r in records]
        assert row["per_seed"]["forgetting_max"] == pytest.approx([r["summary"]["forgetting_max"] for r in records])
        for k, record in enumerate(records):
            assert record["stage_ends"] == [4, 8] and [p["step"] for p in record["curves"]] == [0, 2, 4, 6, 8]
            assert record["R"][0] == json.loads((first[k] / "forgetting.json").read_text())["R"][0]
        log = (run_dirs[1] / "study.log").read_text()
        assert f"branched from {first[1]} after stage A" in log
        if point:
            assert f"stages.1.replay.ratio={point}" in log.splitlines()[0]
    # The point chosen on validation ACC: the curves' validation scores at the last stage end.
    comparison = table["comparison"]
    validation_acc = {}
    for point in ("0.25", "0.5"):
        accs = []
        for k in (0, 1):
            record = json.loads((out / "base" / "replay" / f"stages.1.replay.ratio-{point}" / f"seed{k}" /
                                 "forgetting.json").read_text())
            (last,) = [p["scores"] for p in record["curves"] if p["step"] == 8]
            accs.append((last["A"] + last["B"]) / 2)
        validation_acc[f"replay[stages.1.replay.ratio={point}]"] = float(np.mean(accs))
    assert comparison["selected"]["replay"]["candidates"] == pytest.approx(validation_acc)
    assert comparison["selected"]["replay"]["variant"] == max(validation_acc, key=validation_acc.get)
    # Matched learning: reached exactly when naive's learning lies within replay's points' learning.
    naive_level = np.mean(table["rows"][0]["per_seed"]["learning_newest"])
    replay_levels = [np.mean(r["per_seed"]["learning_newest"]) for r in table["rows"][1:]]
    (matched,) = [m for m in comparison["matched"] if m["method"] == "replay"]
    assert matched["reached"] == (min(replay_levels) - 1e-12 <= naive_level <= max(replay_levels) + 1e-12)
    assert comparison["reference"] == "naive" and comparison["comparisons"] == 2 * 2 + matched["reached"]
    # The resume ran the one killed run only (its checkpoints were pruned: it ran again from stage A's).
    assert "2 runs: 2 already done, 0 to run\n6 runs: 5 already done, 1 to run\n" in printed
    # keep_checkpoints: false: the branched runs wrote no checkpoints, the stage-A runs they branch from keep theirs.
    assert all(list((first[k] / "checkpoints").glob("[0-9]*")) for k in (0, 1))
    assert not list((out / "base").glob("[nr]*/**/checkpoints/[0-9]*"))
    assert all(json.loads(p.read_text())["checkpoints"] is None for p in (out / "base").glob("[nr]*/**/summary.json"))
    # The runs ran in two worker processes; every branched run reused steps an earlier run of its
    # worker compiled (the eval steps at least), and its result is the one its command gives in a
    # process of its own, to the bit.
    logs = sorted((out / "base").glob("[nr]*/**/study.log"))
    assert len(logs) == 6   # naive x 2 seeds, replay x 2 points x 2 seeds
    for log in logs:
        reused = [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines()
                  if line.startswith("study worker ")]
        assert reused and reused[0] >= 1, log
    worker_dir = out / "base" / "replay" / "stages.1.replay.ratio-0.25" / "seed1"
    command = json.loads((worker_dir / "study_run.json").read_text())["command"]
    alone = out.parent / "alone"
    command = [c if not c.startswith("run_dir=") else f"run_dir={alone}" for c in command]
    subprocess.run([sys.executable, *command], check=True, capture_output=True)
    worker_record, alone_record = (json.loads((d / "forgetting.json").read_text()) for d in (worker_dir, alone))
    assert worker_record["R"] == alone_record["R"] and worker_record["curves"] == alone_record["curves"]
    assert (out / "tradeoff.png").stat().st_size > 10_000 and (out / "curves.png").stat().st_size > 10_000


def test_an_interpolation_method_reads_the_trained_runs_of_its_cell_and_seed(tmp_path):
    """`interpolate:` adds one run per alpha and seed whose command interpolates the same seed's
    run of `of` at the point `at` names; those runs come after the trained ones and share no stage A."""
    path = write_study(tmp_path, """
base: base.yaml
seeds: 2
methods: {naive: [], ewc: []}
sweep: {naive: {optim.lr: [1.0e-4, 3.0e-4]}}
select: acc
interpolate:
  wise: {of: naive, at: {optim.lr: 3.0e-4}, alphas: [0.25, 0.75]}
""")
    runs = plan_runs(load_study(path), path, tmp_path / "out")
    wise = [r for r in runs if r.method == "wise"]
    assert [(r.variant, r.seed) for r in wise] == [("wise[alpha=0.25]", 0), ("wise[alpha=0.25]", 1),
                                                   ("wise[alpha=0.75]", 0), ("wise[alpha=0.75]", 1)]
    last = wise[-1]
    assert last.source.run_dir == tmp_path / "out" / "base" / "naive" / "optim.lr-0.0003" / "seed1"
    assert last.source.run_dir in {r.run_dir for r in runs if r.method == "naive"}
    assert last.command == (sys.executable, "-m", "tenure.engine.cli", "interpolate", str(last.source.run_dir),
                            "--alphas", "0.75", "--as-run", str(tmp_path / "out" / "base" / "wise" / "alpha-0.75" / "seed1"))
    assert [r.method for r in plan_runs(load_study(path), path, tmp_path / "out", methods=["wise"])] == ["wise"] * 4
