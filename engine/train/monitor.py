"""Watching validation during training: best-so-far with early stopping, and overfitting."""
from __future__ import annotations

from tenure.models.errors import TenureError


class BestTracker:
    """Tracks `validation/<metric>`; `update` says whether it improved and whether to stop."""

    def __init__(self, metric: str, mode: str, early_stopping, history: dict):
        self.key, self.mode = f"validation/{metric}", mode
        self.patience, self.min_delta = early_stopping.patience, early_stopping.min_delta
        self.best, self.best_step, self.bad_evals = None, None, 0
        self.replayed: list[tuple[dict, bool]] = []  # after a resume: each earlier eval and whether it improved
        for record in history.get("evals", []):
            # An eval without the key (a stage whose own tasks have no validation split, scored for
            # the other tasks' curves) selected nothing when it ran, so it is not replayed either.
            if self.key in record:
                self.replayed.append((record, self.update(record["step"], record)[0]))

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        gain = value - self.best if self.mode == "max" else self.best - value
        return gain > self.min_delta

    def update(self, step: int, scores: dict[str, float]) -> tuple[bool, bool]:
        if self.key not in scores:
            raise TenureError(f"eval.metric: validation produced no '{self.key}' "
                           f"(it has {sorted(scores)})")
        value = scores[self.key]
        if self._better(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True, False
        self.bad_evals += 1
        return False, bool(self.patience) and self.bad_evals >= self.patience


class OverfitMonitor:
    """Warns when validation stops improving while the training loss keeps falling.

    `update` also returns nothing to log but the warning; the train/validation loss gap
    is added to the scores as `validation/generalization_gap` when validation has a loss.
    """

    def __init__(self, window: int = 2, replay: tuple[tuple[float, bool], ...] = ()):
        """`replay`: (train loss, improved) of the stage's evals before a resume, so a warning comes
        at the eval it would have come at in an unbroken run."""
        self.window = window
        self.train_losses: list[float] = []
        self.stalled = 0
        for train_loss, improved in replay:
            self.update(train_loss, {}, improved)

    def update(self, train_loss: float, scores: dict[str, float], improved: bool) -> str | None:
        if "validation/loss" in scores:
            scores["validation/generalization_gap"] = scores["validation/loss"] - train_loss
        falling = bool(self.train_losses) and train_loss < self.train_losses[-1]
        self.train_losses.append(train_loss)
        self.stalled = 0 if improved else self.stalled + (1 if falling else 0)
        if self.stalled >= self.window:
            return (f"validation has not improved for {self.stalled} evaluations while the "
                    f"training loss kept falling (now {train_loss:.4f}): likely overfitting")
        return None
