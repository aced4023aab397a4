"""Early stopping with patience, and the overfitting warning."""
import pytest

from tenure.engine.config.schema import EarlyStoppingConfig
from tenure.models.errors import TenureError
from tenure.engine.train.monitor import BestTracker, OverfitMonitor


def test_best_tracker_patience_and_min_delta():
    tracker = BestTracker("accuracy", "max", EarlyStoppingConfig(patience=2, min_delta=0.01), {})
    results = [tracker.update(s, {"validation/accuracy": a})
               for s, a in ((1, 0.5), (2, 0.6), (3, 0.605), (4, 0.59))]
    assert results == [(True, False), (True, False), (False, False), (False, True)]
    assert (tracker.best, tracker.best_step) == (0.6, 2)


def test_best_tracker_min_mode_and_replay_after_resume():
    history = {"evals": [{"step": 10, "validation/loss": 2.0}, {"step": 20, "validation/loss": 1.5}]}
    tracker = BestTracker("loss", "min", EarlyStoppingConfig(patience=0), history)
    assert (tracker.best, tracker.best_step) == (1.5, 20)
    assert tracker.update(30, {"validation/loss": 1.7}) == (False, False)  # patience 0 = never stop
    # A staged run's eval with nothing to select on (the stage's own tasks have no validation split;
    # the others' curves were scored) selected nothing when it ran, and is not replayed.
    staged = {"evals": [{"step": 3, "validation/A/accuracy": 0.7}, {"step": 6, "validation/score": 0.4},
                        {"step": 9, "validation/score": 0.3}]}
    tracker = BestTracker("score", "max", EarlyStoppingConfig(patience=3), staged)
    assert [(r["step"], improved) for r, improved in tracker.replayed] == [(6, True), (9, False)]
    assert (tracker.best, tracker.bad_evals) == (0.4, 1)


def test_best_tracker_names_a_missing_metric():
    tracker = BestTracker("f1", "max", EarlyStoppingConfig(), {})
    with pytest.raises(TenureError, match="validation produced no 'validation/f1'"):
        tracker.update(1, {"validation/accuracy": 0.3})


def test_overfit_warning_when_validation_stalls_and_train_loss_falls():
    monitor = OverfitMonitor(window=2)
    scores = {"validation/loss": 1.0}
    assert monitor.update(1.2, scores, improved=True) is None
    assert scores["validation/generalization_gap"] == pytest.approx(-0.2)
    assert monitor.update(1.0, {"validation/loss": 1.1}, improved=False) is None
    warning = monitor.update(0.8, {"validation/loss": 1.3}, improved=False)
    assert warning.startswith("validation has not improved for 2 evaluations")
    assert monitor.update(0.7, {}, improved=True) is None  # an improvement resets it


def test_overfit_monitor_replays_the_evals_before_a_resume():
    evals = [(1.2, True), (1.0, False)]  # (train loss since the last eval, improved)
    unbroken, resumed = OverfitMonitor(window=2), OverfitMonitor(window=2, replay=tuple(evals))
    for loss, improved in evals:
        unbroken.update(loss, {}, improved)
    # the eval after the resume warns where the unbroken run's does (a fresh monitor would not yet)
    assert unbroken.update(0.8, {}, False) == resumed.update(0.8, {}, False) is not None
    assert OverfitMonitor(window=2).update(0.8, {}, False) is None
