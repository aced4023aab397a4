"""The shipped forgetting studies (configs/forgetting/, docs/forgetting.md), reduced.

The slow test runs study 1 (split lexnames, the real MiniLM) in its task-incremental setting
for seed 0 only, naive against EWC, exactly as the study runs them (the study file's own
overrides), and asserts the ordering the literature finds robust there: EWC forgets less than
naive. The class-incremental ordering (replay forgets far less than naive) is tested in
tests/test_continual.py::test_minilm_class_incremental_replay_forgets_far_less.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from engine.study.aggregate import ForgettingRecord
from engine.study.config import load_study
from engine.study.plots import _mean_curve

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / "configs/forgetting"
TASK_IL = STUDY_DIR / "split_lexnames_task_il.study.yaml"
CLASS_IL = STUDY_DIR / "split_lexnames_class_il.study.yaml"


def test_shipped_studies_load_and_differ_only_in_heads():
    """Both settings run the same methods with the same overrides, but for `heads`."""
    task_il, class_il = load_study(TASK_IL), load_study(CLASS_IL)
    assert task_il.base == class_il.base and task_il.seeds == class_il.seeds == 3
    assert list(task_il.methods) == list(class_il.methods) == ["naive", "ewc", "l2sp", "replay"]
    for method in task_il.methods:
        assert task_il.methods[method][0] == "heads=per_task" and class_il.methods[method][0] == "heads=shared"
        assert task_il.methods[method][1:] == class_il.methods[method][1:]


def test_curves_of_a_task_without_validation_split_come_from_R():
    """The engine's periodic evals use only the validation split; a task without one (the
    shipped study evaluates on test only) is plotted from its start score and R's rows."""
    record = ForgettingRecord.model_validate({
        "tasks": ["A", "B"], "stages": ["A", "B"], "metric": {"A": "accuracy", "B": "accuracy"},
        "direction": {"A": "max", "B": "max"}, "start_row": [0.25, 0.2], "R": [[0.9, 0.1], [0.6, 0.9]],
        "curves": [{"step": 0, "stage": 0, "scores": {"A": 0.25, "B": 0.2}},
                   {"step": 40, "stage": 0, "scores": {"A": None, "B": None}},
                   {"step": 80, "stage": 1, "scores": {"A": None, "B": None}}],
        "stage_ends": [40, 80]})
    steps, mean, _ = _mean_curve([record], "A")
    assert steps.tolist() == [0, 40, 80] and mean.tolist() == [0.25, 0.9, 0.6]


def _train(run_dir, overrides):
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    result = subprocess.run([sys.executable, "-m", "engine.cli", "train", str(STUDY_DIR / "split_lexnames.yaml"),
                             *overrides, f"run_dir={run_dir}", "train.seed=0", "logging.tensorboard=false"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((run_dir / "forgetting.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two MiniLM runs, one with EWC's Fisher pass
def test_minilm_task_incremental_ewc_forgets_less_than_naive(tmp_path):
    """Study 1, task-IL (a head per task), seed 0: naive fine-tuning on B loses part of A,
    EWC (the study's lambda, exact Fisher) keeps clearly more of it and still learns B."""
    study = load_study(TASK_IL)
    naive = _train(tmp_path / "naive", study.methods["naive"])
    ewc = _train(tmp_path / "ewc", study.methods["ewc"])
    assert naive["R"][0][0] > 0.8 and ewc["R"][0][0] > 0.8        # both learn A first (same stage A)
    assert naive["R"][1][1] > 0.8 and ewc["R"][1][1] > 0.7        # and then B
    assert naive["summary"]["forgetting_max"] > 0.1                # naive loses part of A
    assert ewc["summary"]["forgetting_max"] < naive["summary"]["forgetting_max"] - MARGIN


MARGIN = 0.1
