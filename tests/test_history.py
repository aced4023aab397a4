"""The run history in checkpoints and summaries: RunHistory writes the keys (and JSON) the
engine wrote as a plain dict, so checkpoints of either form resume, branch and interpolate."""
from __future__ import annotations

import json

from tenure.engine.train.history import RunHistory

SAVED = {  # a two-stage run's history as a checkpoint at its end holds it
    "baseline": {"validation/A/accuracy": 0.25, "test/A/accuracy": 0.3},
    "start_row": {"A": 0.3, "B": 0.2},
    "curves": [{"step": 0, "stage": 0, "scores": {"A": 0.25, "B": 0.2}},
               {"step": 2, "stage": 0, "scores": {"A": 0.5, "B": 0.2}}],
    "train_loss": [1.5, 1.25, 1.0],
    "evals": [{"step": 2, "stage": 0, "validation/A/accuracy": 0.5, "validation/score": 0.5}],
    "overfit_warnings": [{"step": 2, "stage": 0}],
    "early_stops": [{"step": 2, "stage": 0}],
    "final": {"validation/A/accuracy": 0.5, "test/A/accuracy": 0.55},
    "final_step": 4,
    "R": [{"A": 0.55, "B": 0.2}, {"A": 0.4, "B": 0.7}],
    "stage_ends": [2, 4],
    "stage_digests": [None, "ab" * 32],
}


def test_a_saved_history_reads_back_and_writes_the_same_json():
    history = RunHistory.from_dict(json.loads(json.dumps(SAVED)))
    assert history.R[1] == {"A": 0.4, "B": 0.7} and history.final_step == 4
    assert json.dumps(history.to_dict()) == json.dumps(SAVED)


def test_a_new_run_writes_only_what_it_has_measured():
    history = RunHistory()
    assert history.to_dict() == {}
    history.baseline = {}  # a run without evaluation splits: measured, and nothing to measure again
    history.train_loss.append(2.0)
    assert history.to_dict() == {"baseline": {}, "train_loss": [2.0]}


def test_a_stage_row_replaces_the_one_a_resumed_stage_had():
    history = RunHistory.from_dict(SAVED)
    assert history.has_row(1, 4) and not history.has_row(1, 6)
    history.set_row(1, {"A": 0.35, "B": 0.75}, {"A": 0.3, "B": 0.7}, 6, "cd" * 32)
    assert history.R == [SAVED["R"][0], {"A": 0.35, "B": 0.75}]
    assert history.stage_ends == [2, 6] and history.stage_digests == [None, "cd" * 32]
    assert history.R_validation == [None, {"A": 0.3, "B": 0.7}]  # stage 0's ended before they were recorded
    old = RunHistory(R=[{"A": 0.5}], stage_ends=[2])  # written before digests were recorded
    old.set_row(1, {"A": 0.4}, {"A": 0.45}, 4, "ef" * 32)
    assert old.stage_digests == [None, "ef" * 32]
