"""One stage of a run: the baseline before the first, then the fit loop with its hooks, then the
stage end's row of R (and, for a run that keeps its best, that checkpoint as the result)."""
from __future__ import annotations

import json

import jax
import numpy as np

from tenure.engine.config.schema import given, to_dict
from tenure.engine.config.stages import score_mode
from tenure.engine.runtime import distributed
from tenure.engine.runtime.distributed import print_primary
from tenure.engine.runtime.progress import Progress
from tenure.engine.tasks import baseline_cache
from tenure.engine.train.build import StageRun
from tenure.engine.train.fit import fit
from tenure.engine.train.history import RunHistory
from tenure.engine.train.hooks import (CheckpointSaver, Evaluation, ForgettingGuard, StageContext, TrainLogger,
                                       evaluate_all, task_score)
from tenure.engine.train.monitor import BestTracker, OverfitMonitor
from tenure.engine.train.params import params_digest
from tenure.models.lora import fresh_adapters_zeroed


class StageRunner:
    """Runs the stages of one run of `trainer` (engine/train/trainer.py) into `history`, saving
    through `ckpt` and logging to `tb`; `stop`: the run's SIGTERM / SIGINT handling."""

    def __init__(self, trainer, ckpt, tb, stop, history: RunHistory):
        self.trainer, self.ckpt, self.tb, self.stop, self.history = trainer, ckpt, tb, stop, history
        self.cfg = trainer.cfg
        self.last_eval: tuple | None = None  # (stage index, (local step, params, validation scores))
        self.run_extras = {"config": to_dict(trainer.cfg), "config_given": given(trainer.cfg),
                           "stages_computed": trainer.plan.computed,
                           "frozen_base": trainer.frozen_base.meta(), "labels": trainer.labels_json(),
                           "training_data": trainer.training_data}

    def context(self, sr: StageRun) -> StageContext:
        trainer = self.trainer
        return StageContext(sr=sr, offset=trainer.offsets[sr.stage.index], tasks=trainer.tasks,
                            mesh=trainer.backbone.mesh, evaluators=trainer.evaluators(sr), history=self.history,
                            tb=self.tb, single=trainer.single, kl_start=trainer.kl_start(sr))

    def saver(self, sr: StageRun) -> CheckpointSaver:
        return CheckpointSaver(self.context(sr), self.ckpt, self.trainer.frozen_base, self.run_extras,
                               every=self.cfg.checkpoint.every_steps, enabled=self.cfg.checkpoint.enabled)

    def baseline(self, sr: StageRun) -> None:
        """Every task's scores on the starting model, or those `eval.baseline_cache` holds for it."""
        tasks, cache = self.trainer.tasks, self.cfg.eval.baseline_cache
        if cache:
            scores, cached = baseline_cache.get_or_compute(
                # LoRA's fresh adapters (B = 0) without their random A: runs of every seed share one start row
                cache, baseline_cache.key(self.cfg, params_digest(fresh_adapters_zeroed(sr.state.params)),
                                          tasks.label_masks(sr.stage, self.cfg.heads)),
                lambda: self._score_baseline(sr))
            if cached:
                print_primary(f"baseline: from {cache} (the same starting weights and task settings)")
        else:
            scores = self._score_baseline(sr)
        self.history.baseline = scores
        self.history.start_row = {t: task_score(tasks, scores, t) for t in tasks.by_name}
        self.history.curves = [{"step": 0, "stage": 0, "scores": {
            t: task_score(tasks, scores, t, ("validation", "test")) for t in tasks.by_name}}]
        self.tb.scalars(0, {f"baseline/{k}": v for k, v in scores.items()})
        print_primary("baseline (starting model, fresh head): "
                      + json.dumps({k: round(v, 4) for k, v in scores.items()}))

    def _score_baseline(self, sr: StageRun) -> dict[str, float]:
        """Every task's scores on the starting model (decoders: also the few-shot prompting baseline)."""
        tasks, evaluators, params = self.trainer.tasks, self.trainer.evaluators(sr), sr.state.params
        scores = evaluate_all(tasks, evaluators, params, ("validation", "test"), self.trainer.backbone.mesh)
        for name, by_split in evaluators.items():
            prefix = f"{name}/" if tasks.multi else ""
            spec = tasks.by_name[name].task.spec
            for split, evaluator in by_split.items():
                if evaluator.generate is not None and spec.few_shot:
                    few = evaluator.generate(params, with_examples=True)
                    scores.update({f"{split}/{prefix}{spec.few_shot}shot_{k}": v for k, v in few.items()})
        return scores

    def _best_tracker(self, stage) -> BestTracker:
        cfg, trainer = self.cfg, self.trainer
        return BestTracker(cfg.eval.metric if trainer.single else "score",
                           score_mode((trainer.tasks.by_name[t].task.mode for t in stage.weights), cfg.eval.mode),
                           cfg.train.early_stopping, {"evals": self.history.stage_evals(stage.index)})

    def _interrupted(self):
        if jax.process_count() > 1:  # a collective, so only where every process saves anyway
            every = self.cfg.checkpoint.every_steps
            return lambda step: step % every == 0 and self.stop.requested_anywhere()
        return lambda step: self.stop.requested

    def run_stage(self, sr: StageRun, state, local: int) -> tuple:
        """Trains stage `sr` from its local step `local`: (state, its forgetting guard or None, last step)."""
        cfg, trainer, stage = self.cfg, self.trainer, sr.stage
        if self.history.baseline is None:
            self.baseline(sr)
        print_primary(f"stage {stage.index + 1}/{len(trainer.stages)} {stage.name}: steps {sr.steps}  "
                      f"losses {', '.join(sr.losses)}\n{sr.trainability.summary()}")
        ctx = self.context(sr)
        best = self._best_tracker(stage)
        guard = self.guard(sr, state, ctx, best.mode)
        progress = Progress(sr.steps, desc=f"train {stage.name}" if not trainer.single else "train", initial=local,
                            enabled=distributed.is_primary() and cfg.logging.progress)
        every = cfg.train.eval_every
        stage_losses = self.history.train_loss[len(self.history.train_loss) - local:] if local else []
        # A resume between two evals: the gap's train losses so far, and the stage's evals replayed.
        logger = TrainLogger(ctx, progress, self.ckpt.latest_step, every=cfg.train.log_every,
                             losses=stage_losses[local - local % every:])
        overfit = OverfitMonitor(replay=tuple(
            (float(np.mean(stage_losses[(record["step"] - 1) // every * every:record["step"]])), improved)
            for record, improved in best.replayed))
        save = self.saver(sr)
        evaluate = Evaluation(ctx, best=best, overfit=overfit, guard=guard, logger=logger, save=save,
                              take_row=lambda params, last, step, seen: self.take_row(sr, params, last, step, seen),
                              ends_on_last=guard is None and not trainer.keeps_best, every=every)
        state, last, _, signalled = fit(sr.step_fn, state, sr.train_iter, ctx.mesh, first=local + 1, last=sr.steps,
                                        log=logger, evaluate=evaluate, save=save, interrupted=self._interrupted())
        progress.close()
        self.ckpt.wait()
        self.last_eval = (stage.index, evaluate.last)
        if signalled:
            print_primary(self.stop.stopped_message(ctx.offset + last, str(self.ckpt.directory)))
            raise SystemExit(self.stop.exit_code)
        return state, guard, last

    def guard(self, sr: StageRun, state, ctx: StageContext | None = None, mode: str | None = None):
        """Stage `sr`'s forgetting guard (None without one), its earlier evals replayed from the history."""
        self.ckpt.pin(None)  # an earlier stage's pick: this stage's first checkpoint holds its R row
        if not sr.stage.guard:
            return None
        return ForgettingGuard(sr.stage, ctx or self.context(sr), state.params,
                               mode or self._best_tracker(sr.stage).mode, pin=self.ckpt.pin,
                               restore=lambda step: self.restore_params(sr, state, step))

    def restore_params(self, sr: StageRun, state, step: int):
        """The params of checkpoint `step` of stage run `sr` (`state`: a state of that stage)."""
        restored, _, _ = self.trainer.restore(self.ckpt, sr, state, self.ckpt.read_extra(step), step)
        return restored.params

    def finish_stage(self, sr: StageRun, state, last: int, guard: ForgettingGuard | None = None) -> tuple:
        """R's row for the stage and its result: (the result params, their run step). The result is the
        pick of the stage's forgetting `guard`, the best checkpoint of a run that keeps its best, else the
        last weights. Nothing to evaluate where the row for this stage end is in the history already
        (taken at the stage's last eval, or before a kill, resume or branch)."""
        index = sr.stage.index
        end = self.trainer.offsets[index] + last
        params, final_step = guard.result(state.params) if guard is not None else (state.params, None)
        final_step = final_step or end
        if self.history.has_row(index, end):
            return params, final_step
        best = self.ckpt.best_step()
        if self.trainer.keeps_best and best is not None and best != final_step:
            params, final_step = self.restore_params(sr, state, best), best
        seen = self.last_eval[1] if self.last_eval is not None and self.last_eval[0] == index else None
        self.take_row(sr, params, last, final_step, seen)
        return params, final_step

    def take_row(self, sr: StageRun, params, last: int, final_step: int, seen: tuple | None = None) -> None:
        """Evaluates `params` as stage `sr`'s result after its local step `last`: R's row. `seen`:
        (local step, params, validation scores) of the stage's newest eval."""
        trainer, index = self.trainer, sr.stage.index
        evaluators, mesh = trainer.evaluators(sr), trainer.backbone.mesh
        if seen is not None and seen[0] == last and seen[1] is params:
            # These very weights were evaluated on validation at the stage's last step: same scores.
            scores = seen[2] | evaluate_all(trainer.tasks, evaluators, params, ("test",), mesh)
        else:
            scores = evaluate_all(trainer.tasks, evaluators, params, ("validation", "test"), mesh)
        self.history.final, self.history.final_step = scores, final_step
        row = {t: task_score(trainer.tasks, scores, t) for t in trainer.tasks.by_name}
        validation = {t: task_score(trainer.tasks, scores, t, ("validation",)) for t in trainer.tasks.by_name}
        self.history.set_row(index, row, validation, trainer.offsets[index] + last, params_digest(params))
        self.tb.scalars(final_step, {f"final/{k}": v for k, v in scores.items()}
                        | {f"R/{t}": v for t, v in row.items() if v is not None})
