"""What the fit loop calls at its cadence (`every`): the training-metrics logger, the validation
evaluation (with best-so-far, early stopping, the overfitting monitor and the forgetting guard)
and the checkpoint saver. They know the stage, its tasks and the run history; fit does not."""
from __future__ import annotations

import types
from dataclasses import dataclass

import jax
import numpy as np

from tenure.engine.config.stages import Stage, guarded_tasks
from tenure.engine.data.pipeline import to_global_batch
from tenure.engine.runtime.distributed import print_primary
from tenure.engine.train.build import StageRun, Tasks
from tenure.engine.train.divergence import describe as describe_divergence
from tenure.engine.train.history import RunHistory
from tenure.engine.train.monitor import BestTracker, OverfitMonitor
from tenure.models.errors import TenureError


def evaluate_all(tasks: Tasks, evaluators, params, splits, mesh, only=None) -> dict[str, float]:
    """`<split>/<metric>` (one task) or `<split>/<task>/<metric>` scores of every task."""
    scores = {}
    for name, by_split in evaluators.items():
        if only is not None and name not in only:
            continue
        prefix = f"{name}/" if tasks.multi else ""
        for split in splits:
            if split in by_split:
                batches = (to_global_batch(b, mesh) for b in tasks.by_name[name].eval_batches[split])
                for metric, value in by_split[split](params, batches).items():
                    scores[f"{split}/{prefix}{metric}"] = value
    return scores


def task_score(tasks: Tasks, scores: dict, name: str, splits=("test", "validation")) -> float | None:
    """The metric R records for task `name`, from the first split present."""
    prefix = f"{name}/" if tasks.multi else ""
    metric = tasks.by_name[name].task.metric
    for split in splits:
        key = f"{split}/{prefix}{metric}"
        if key in scores:
            return scores[key]
    return None


@dataclass
class StageContext:
    """What the hooks of one stage run share."""
    sr: StageRun
    offset: int              # run step of the stage's local step 0
    tasks: Tasks
    mesh: object
    evaluators: dict
    history: RunHistory
    tb: object               # runtime/loggers.py's run loggers
    single: bool             # a single-task run: selects on eval.metric, not the stage's score
    kl_start: object = None  # tasks/kl_start.py KLToStart (eval.kl_to_start), else None

    def validation(self, params, only=None) -> dict:
        return evaluate_all(self.tasks, self.evaluators, params, ("validation",), self.mesh, only=only)

    def validation_row(self, scores: dict, names) -> dict:
        return {t: task_score(self.tasks, scores, t, ("validation",)) for t in names}


class TrainLogger:
    """Every step's metrics (one step late): the divergence halt, the loss history, the progress
    bar; the TensorBoard / W&B scalars every `every` steps."""

    def __init__(self, ctx: StageContext, progress, latest_checkpoint, every: int, losses: list[float]):
        """`losses`: the training losses since the stage's last eval (a resume between two evals)."""
        self.ctx, self.progress, self.latest_checkpoint, self.every = ctx, progress, latest_checkpoint, every
        self.losses = list(losses)  # since the last eval (the overfitting monitor's train loss)

    def __call__(self, step: int, metrics) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tokens = int(values.pop("tokens"))
        if values.get("divergence/halt"):
            self._halt(step, values)
        self.losses.append(values["loss"])
        self.ctx.history.train_loss.append(values["loss"])
        self.progress.update(step, values["loss"], tokens)
        if step % self.every == 0:
            self.ctx.tb.scalars(self.ctx.offset + step, {f"train/{k}": v for k, v in values.items()}
                                | {"train/tokens_per_second": self.progress.tokens_per_second})

    def _halt(self, step: int, values: dict) -> None:
        guard = types.SimpleNamespace(**{k.split("/", 1)[1]: v for k, v in values.items()
                                         if k.startswith("divergence/")})
        kept = self.latest_checkpoint()
        raise TenureError(
            describe_divergence(guard, self.ctx.offset + step, values) + "; that update was not applied or saved; "
            + (f"a rerun resumes from checkpoint step {kept}" if kept is not None else "no checkpoint yet")
            + " (lower optim.lr, or see the `divergence` config section)")

    def take_losses(self) -> list[float]:
        """The training losses since the last eval (and starts collecting anew)."""
        losses, self.losses = self.losses, []
        return losses


class CheckpointSaver:
    """Saves the stage's state every `every` steps (and from the evaluation hook), with the extras
    a resume, a branch or `tenure eval` reads back; nothing when `enabled` is false."""

    def __init__(self, ctx: StageContext, ckpt, frozen_base, run_extras: dict, every: int, enabled: bool):
        """`run_extras`: the extras every checkpoint of the run carries (config, labels, ...)."""
        self.ctx, self.ckpt, self.frozen_base, self.run_extras, self.every = ctx, ckpt, frozen_base, run_extras, every
        self.enabled = enabled

    def __call__(self, local: int, state, *, stopped: bool = False, metrics=None) -> None:
        if not self.enabled:
            return
        sr, index = self.ctx.sr, self.ctx.sr.stage.index
        step = self.ctx.offset + local
        self.ckpt.save(step, self.frozen_base.stored(state, index), sr.train_iter.get_state(), force=True,
                       metrics=metrics,
                       extra={"step": step, "stage": index, "local_step": local, "stopped": stopped,
                              "history": self.ctx.history.to_dict(), "replay_buffers": sr.replay_buffers,
                              **self.run_extras})


class ForgettingGuard:
    """A forgetting budget: the guarded tasks' validation metric may drop at most `max_drop` below
    its value at the start of the stage. The stage keeps its best weights (by its own score) among
    the evals within budget, and stops after `patience` evals out of budget in a row.

    The start values live in the run history and the pick's checkpoint is pinned, so a resumed
    stage replays its earlier evals and ends on the pick an unbroken run would have kept."""

    def __init__(self, stage: Stage, ctx: StageContext, params, mode: str, *, pin, restore):
        """`mode`: whether a larger stage score is better (the stage's best-so-far's). `pin(run step)`
        keeps that step's checkpoint; `restore(run step)`: its params (a pick made before a resume)."""
        self.stage, self.ctx, self.mode, self.pin, self.restore = stage, ctx, mode, pin, restore
        self.names = guarded_tasks(stage.guard)
        starts = ctx.history.guard_starts = ctx.history.guard_starts or {}
        if str(stage.index) not in starts:  # a fresh stage (a resumed one measured them when it began)
            starts[str(stage.index)] = ctx.validation_row(ctx.validation(params, only=self.names), self.names)
        self.start = starts[str(stage.index)]
        self.best_score, self.best_step, self.best_params, self.out = None, None, None, 0
        for record in ctx.history.stage_evals(stage.index):
            self._judge(record["step"], record)

    def within(self, scores) -> bool:
        for t, value in self.ctx.validation_row(scores, self.names).items():
            drop = (self.start[t] - value) if self.ctx.tasks.by_name[t].task.mode == "max" else (value - self.start[t])
            if drop > self.stage.guard.max_drop:
                return False
        return True

    def _judge(self, step: int, scores: dict) -> bool:
        """Counts an eval in or out of budget; whether it is the new pick."""
        if not self.within(scores):
            self.out += 1
            return False
        self.out = 0
        score, best = scores["validation/score"], self.best_score
        if best is not None and not (score > best if self.mode == "max" else score < best):
            return False
        self.best_score, self.best_step, self.best_params = score, step, None
        self.pin(self.ctx.offset + step)
        return True

    def update(self, step: int, scores: dict, params) -> bool:
        """Whether to stop the stage."""
        if self._judge(step, scores):
            self.best_params = jax.tree.map(np.asarray, jax.device_get(params))
        if self.out >= self.stage.guard.patience:
            print_primary(f"guard: {', '.join(self.names)} out of budget (max_drop {self.stage.guard.max_drop}) "
                          f"for {self.out} evals; stopping the stage")
            return True
        return False

    def result(self, params) -> tuple:
        """(the stage's result params, their run step; None: the last weights, `params`)."""
        if self.best_step is None:
            print_primary("guard: no eval stayed within the budget; the stage ends with its last weights")
            return params, None
        step = self.ctx.offset + self.best_step
        print_primary(f"guard: keeping step {step} (best {self.best_score:.4f} within budget)")
        if self.best_params is None:  # picked before a resume: from its pinned checkpoint
            return self.restore(step), step
        return jax.device_put(self.best_params, self.ctx.sr.state_shardings.params), step


class Evaluation:
    """Every `every` steps and at the stage's last: every task's validation metrics, the stage's
    own score, best-so-far and early stopping, the overfitting monitor, the forgetting guard, the
    history's evals and curves; then a checkpoint (and R's row where the stage ends here).
    Returns whether to stop the stage."""

    def __init__(self, ctx: StageContext, *, best: BestTracker, overfit: OverfitMonitor, guard: ForgettingGuard | None,
                 logger: TrainLogger, save: CheckpointSaver, take_row, ends_on_last: bool, every: int):
        """`take_row(params, local, run step, last eval)`: R's row; `ends_on_last`: the stage's result is the
        weights of its last eval (not its best checkpoint, nor the guard's pick)."""
        self.ctx, self.best, self.overfit, self.guard, self.logger, self.save = ctx, best, overfit, guard, logger, save
        self.take_row, self.ends_on_last, self.every = take_row, ends_on_last, every
        self.last: tuple | None = None  # (local step, params, validation scores) of the newest eval

    def __call__(self, step: int, state) -> bool:
        ctx = self.ctx
        scores = ctx.validation(state.params)
        self.last = (step, state.params, dict(scores))
        if ctx.kl_start is not None:
            scores.update({f"kl_start/{task}": value for task, value in ctx.kl_start(state.params).items()})
            scores["weight_distance"] = ctx.kl_start.distance(state.params)
        if not ctx.single:  # the stage's own score: mean of its tasks' validation metrics
            own = [v for v in ctx.validation_row(scores, ctx.sr.stage.weights).values() if v is not None]
            if own:
                scores["validation/score"] = float(np.mean(own))
        ctx.tb.scalars(ctx.offset + step, scores)
        stop = self._monitor(step, scores, state.params)
        if (step == ctx.sr.steps or stop) and self.ends_on_last:
            # The stage ends on these weights: R's row goes into its last checkpoint, so a
            # resume or a branch from here does not evaluate the stage end again.
            self.take_row(state.params, step, ctx.offset + step, self.last)
        self.save(step, state, stopped=stop, metrics=scores)
        if stop and self.best.patience and self.best.bad_evals >= self.best.patience:
            print_primary(f"early stopping at step {ctx.offset + step}: no improvement in "
                          f"{self.best.key} for {self.best.patience} evals")
        return stop

    def _monitor(self, step: int, scores: dict, params) -> bool:
        """Best-so-far, early stopping, overfitting, the guard and the history; whether to stop."""
        ctx, at = self.ctx, {"step": self.ctx.offset + step, "stage": self.ctx.sr.stage.index}
        # Without a validation split there is nothing to select or stop on (R uses the test split).
        validated = any(k.startswith("validation/") for k in scores)
        # Selection needs the stage's own score: a stage whose tasks have no validation split
        # still records the other tasks' curves, but selects and stops on nothing.
        selectable = validated and (ctx.single or self.best.key in scores)
        improved, stop = self.best.update(step, scores) if selectable else (False, False)
        if self.guard is not None:
            stop = self.guard.update(step, scores, params) or stop
        losses = self.logger.take_losses()
        warning = self.overfit.update(float(np.mean(losses)), scores, improved) if selectable else None
        if validated:
            print_primary(f"step {at['step']}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items()))
                          + ("  (best so far)" if improved else ""))
            ctx.history.evals.append({"step": step, "stage": at["stage"], **scores})
            ctx.history.curves.append({**at, "scores": ctx.validation_row(scores, ctx.tasks.by_name)}
                                      | ({"kl_start": {k.split("/", 1)[1]: v for k, v in scores.items()
                                                       if k.startswith("kl_start/")},
                                          "weight_distance": scores["weight_distance"]}
                                         if ctx.kl_start is not None else {}))
        if warning:
            print_primary(f"warning: step {at['step']}: {warning}")
            ctx.history.overfit_warnings.append(dict(at))
        if stop and self.best.patience and self.best.bad_evals >= self.best.patience:
            ctx.history.early_stops.append(dict(at))
        return stop
