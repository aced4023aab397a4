"""`tenure train`: the backbone once, then every stage through the same `fit` loop.

Before the first stage every task is evaluated on the starting model; during a stage every
task's validation metric is taken each `train.eval_every` steps (the curves, where the
stability gap shows); at each stage end every task's test metric (validation if no test)
fills a row of the accuracy matrix R. Checkpoints carry the stage, its step, the history
(R so far, curves) and, in the train state, the regularisers' anchors and Fisher, so a killed
run resumes exactly. A single-task config is a run of one stage, and keeps the best validation
checkpoint as its result (so does a run of one stage with checkpoint.keep_best); in a staged
run each stage hands its last weights to the next (or, under a forgetting guard, its best
weights within the budget).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import multihost_utils

from tenure.engine.runtime import atomic, distributed
from tenure.engine.continual.branch import check_branch, check_stage_end, computed_stages, source_checkpoints
from tenure.engine.train import baseline_cache
from tenure.engine.train.build import (Backbone, StageRun, Tasks, build_backbone, build_stage, build_tasks, eval_models,
                                       lora_spec, start_params)
from tenure.engine.runtime.checkpoint import Checkpointer, directory_problem, nonfinite_leaves
from tenure.engine.config.schema import Config, as_today, to_dict
from tenure.engine.continual.stage_regularizers import regularizers
from tenure.engine.data.pipeline import to_global_batch
from tenure.engine.tasks.evaluate import make_evaluators
from tenure.engine.train.divergence import describe as describe_divergence
from tenure.engine.train.fit import fit
from tenure.engine.runtime.loggers import run_loggers
from tenure.engine.train.monitor import BestTracker, OverfitMonitor
from tenure.engine.runtime.progress import Progress
from tenure.engine.continual.report import forgetting_record, r_table, start_end_table, write_forgetting
from tenure.engine.runtime.resume_check import compare_for_resume, drift_message
from tenure.engine.runtime.runlock import RunLock, is_inside, set_aside_run
from tenure.engine.runtime.signals import StopSignals
from tenure.engine.config.stages import Stage, guarded_tasks, r_split, resolve
from tenure.engine.train.trainability import compile_trainability
from tenure.models.errors import TenureError
from tenure.models.hf import export_hf
from tenure.models.kinds import head_of


def _print(msg: str) -> None:
    if distributed.is_primary():
        print(msg, flush=True)


def abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def to_host(params):
    """Full numpy copies of (possibly cross-host sharded) params on every process."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def params_digest(params) -> str:
    """SHA-256 of every parameter's path, dtype, shape and bytes: a checkpoint's weights by content."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(to_host(params))[0]:
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}\n".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


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


def _table(metric_names, columns: dict[str, dict[str, float]]) -> str:
    heads = list(columns)
    width = max(len(n) for n in metric_names) + 2
    lines = ["".ljust(width) + "".join(h.rjust(26) for h in heads)]
    for name in metric_names:
        cells = "".join(
            (f"{columns[h][name]:.4f}" if name in columns[h] else "-").rjust(26) for h in heads)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


class Trainer:
    """Holds what every stage shares (backbone, tasks, checkpoints, logs, history)."""

    def __init__(self, cfg: Config, *, keep_pretrained_head: bool = False):
        """`keep_pretrained_head`: the model directory's task head is the model (evaluating an export)."""
        self.cfg = cfg
        self.run_dir = pathlib.Path(cfg.run_dir)
        task_specs, self.stages = resolve(cfg)
        modes = {s.trainable.mode == "lora" for s in self.stages}
        if len(modes) > 1:
            raise TenureError("stages: LoRA changes the parameter tree, so either every stage or none uses "
                              "trainable.mode=lora")
        self.backbone: Backbone = build_backbone(cfg)
        self.tasks: Tasks = build_tasks(cfg, self.backbone, task_specs,
                                        trained=list(dict.fromkeys(t for s in self.stages for t in s.weights)))
        self.lora = lora_spec(self.stages[0].trainable)
        self.start_params, self.param_shardings, self.frozen_base = start_params(
            cfg, self.stages, self.backbone, self.tasks, keep_pretrained_head=keep_pretrained_head)
        self.single = len(self.stages) == 1 and not self.tasks.multi
        # Ends on its best validation checkpoint (checkpoint.keep_best), not its last weights: a
        # single-task run, or a run of one stage beside tasks it only evaluates (the quickstart).
        self.keeps_best = self.single or (len(self.stages) == 1 and self.stages[0].guard is None
                                          and cfg.checkpoint.keep_best)
        self.stages_computed = computed_stages(cfg)  # checkpoints record it: a branch compares it
        self.offsets = [sum(s.steps or 0 for s in self.stages[:i]) for i in range(len(self.stages))]
        self.history: dict = {}
        self._stage_evaluators: dict[int, tuple] = {}  # stage index -> (its StageRun, its evaluators)
        self._last_validation: tuple | None = None  # (stage index, step, params, validation scores)

    # -- one stage -------------------------------------------------------------------------
    def _regularize(self, index: int, params, previous_extra: dict, compute: bool):
        def regularize(trainability, model):
            return regularizers(self.cfg, self.stages, index, self.backbone, self.tasks, trainability, params,
                                self.param_shardings, self.start_params, previous_extra,
                                models=self._models(model) if compute else None, model=model)
        return regularize

    def _extra_shapes(self, upto: int) -> dict:
        """The regulariser trees stage `upto` starts with, as zeros (a checkpoint's restore target)."""
        extra = {}
        for index in range(upto):
            stage = self.stages[index]
            trainability = compile_trainability(self.start_params, stage.trainable,
                                                num_layers=self.backbone.arch.num_layers)
            _, extra = regularizers(self.cfg, self.stages, index, self.backbone, self.tasks, trainability,
                                    self.start_params, self.param_shardings, self.start_params, extra)
        return extra

    def _build(self, index: int, params, previous_extra: dict, compute: bool = True) -> StageRun:
        if params is self.start_params:  # the train step donates its state; the start params stay
            params = jax.tree.map(jnp.copy, params)
        return build_stage(self.cfg, self.stages[index], self.backbone, self.tasks, params, self.param_shardings,
                           regularize=self._regularize(index, params, previous_extra, compute))

    def _save(self, sr: StageRun, local: int, state, *, stopped: bool = False, metrics=None) -> None:
        index = sr.stage.index
        step = self.offsets[index] + local
        self.ckpt.save(step, self.frozen_base.stored(state, index), sr.train_iter.get_state(), force=True,
                       metrics=metrics,
                       extra={"step": step, "stage": index, "local_step": local,
                              "stopped": stopped, "history": self.history, "config": to_dict(self.cfg),
                              "stages_computed": self.stages_computed,
                              "replay_buffers": sr.replay_buffers, "frozen_base": self.frozen_base.meta(),
                              "labels": self.tasks.label_vocab.to_json() if self.tasks.label_vocab else None})

    def restore(self, ckpt: Checkpointer, sr: StageRun, like, meta: dict, step: int | None = None) -> tuple:
        """(state, data state, extras) of checkpoint `step` (None: the newest that reads back) of
        stage run `sr`, whose checkpoints have extras like `meta`; `like` is a state of that stage,
        which gives the frozen leaves a checkpoint leaves out (engine/train/frozen_base.py)."""
        where = str(ckpt.directory if step is None else ckpt.step_dir(step))
        target = self.frozen_base.target(abstract(like, sr.state_shardings), meta, where)
        try:
            if step is None:
                stored, data_state, extra = ckpt.restore_latest_good(target)
            else:
                stored, data_state, extra = ckpt.restore(step, target)
        except TenureError:
            trained_from = ((meta.get("config") or {}).get("model") or {}).get("path")
            if trained_from is not None and trained_from != self.cfg.model.path:
                raise TenureError(f"checkpoint {where} was trained from model.path {trained_from}, not this config's "
                                  f"{self.cfg.model.path}, whose weights have another shape; use the config it was "
                                  f"trained with (model.path={trained_from})") from None
            raise
        bad = nonfinite_leaves(stored)  # saves refuse them, so the files were damaged since
        if bad:
            raise TenureError(f"checkpoint {ckpt.step_dir(ckpt.restored_step)}: non-finite values (NaN or Inf) in "
                              f"{len(bad)} array{'s' * (len(bad) > 1)} (first: {bad[0]}); it is damaged: move that "
                              "step directory away to resume from the one before, or --restart")
        return self.frozen_base.joined(stored, like.params), data_state, extra

    def _models(self, model) -> dict:
        return eval_models(self.cfg, self.backbone, self.tasks, model, self.lora)

    def _evaluators(self, sr: StageRun):
        """The stage's evaluators, built once per stage run (each jitted eval step compiles once)."""
        built = self._stage_evaluators.get(sr.stage.index)
        if built is None or built[0] is not sr:
            built = (sr, make_evaluators(self.tasks, self._models(sr.model), self.backbone.mesh,
                                         sr.state_shardings.params, self.backbone.tokenizer))
            self._stage_evaluators[sr.stage.index] = built
        return built[1]

    def _baseline(self, sr: StageRun, evaluators) -> None:
        cache = self.cfg.eval.baseline_cache
        cache_key = baseline_cache.key(self.cfg, params_digest(sr.state.params)) if cache else None
        scores = baseline_cache.lookup(cache, cache_key) if cache else None
        if scores is not None:
            _print(f"baseline: from {cache} (the same starting weights and task settings)")
        else:
            scores = self._score_baseline(sr, evaluators)
            if cache:
                baseline_cache.store(cache, cache_key, scores)
        self.history["baseline"] = scores
        self.history["start_row"] = {t: task_score(self.tasks, scores, t) for t in self.tasks.by_name}
        self.history["curves"] = [{"step": 0, "stage": 0, "scores": {
            t: task_score(self.tasks, scores, t, ("validation", "test")) for t in self.tasks.by_name}}]
        self.tb.scalars(0, {f"baseline/{k}": v for k, v in scores.items()})
        _print("baseline (starting model, fresh head): " + json.dumps({k: round(v, 4) for k, v in scores.items()}))

    def _score_baseline(self, sr: StageRun, evaluators) -> dict[str, float]:
        scores = evaluate_all(self.tasks, evaluators, sr.state.params, ("validation", "test"), self.backbone.mesh)
        for name, by_split in evaluators.items():  # decoders: the prompting baseline
            prefix = f"{name}/" if self.tasks.multi else ""
            spec = self.tasks.by_name[name].task.spec
            for split, evaluator in by_split.items():
                if evaluator.generate is not None and spec.few_shot:
                    few = evaluator.generate(sr.state.params, with_examples=True)
                    scores.update({f"{split}/{prefix}{spec.few_shot}shot_{k}": v for k, v in few.items()})
        return scores

    def run_stage(self, sr: StageRun, state, local: int) -> tuple:
        cfg, stage, index = self.cfg, sr.stage, sr.stage.index
        offset = self.offsets[index]
        evaluators = self._evaluators(sr)
        if "baseline" not in self.history:
            self._baseline(sr, evaluators)
        _print(f"stage {index + 1}/{len(self.stages)} {stage.name}: steps {sr.steps}  "
               f"losses {', '.join(sr.losses)}\n{sr.trainability.summary()}")
        stage_evals = [e for e in self.history.get("evals", []) if e.get("stage", 0) == index]
        modes = {self.tasks.by_name[t].task.mode for t in stage.weights}  # its tasks' own direction
        best = BestTracker(cfg.eval.metric if self.single else "score",
                           modes.pop() if len(modes) == 1 else cfg.eval.mode,
                           cfg.train.early_stopping, {"evals": stage_evals})
        guard = _Guard(stage, self, evaluators, state.params) if stage.guard else None
        overfit, train_losses = OverfitMonitor(), []
        progress = Progress(sr.steps, desc=f"train {stage.name}" if not self.single else "train", initial=local,
                            enabled=distributed.is_primary() and cfg.logging.progress)

        def on_metrics(step, metrics):
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            tokens = int(values.pop("tokens"))
            if values.get("divergence/halt"):
                guard = types.SimpleNamespace(**{k.split("/", 1)[1]: v for k, v in values.items()
                                                 if k.startswith("divergence/")})
                kept = self.ckpt.latest_step()
                raise TenureError(
                    describe_divergence(guard, offset + step, values) + "; that update was not applied or saved; "
                    + (f"a rerun resumes from checkpoint step {kept}" if kept is not None else "no checkpoint yet")
                    + " (lower optim.lr, or see the `divergence` config section)")
            train_losses.append(values["loss"])
            self.history.setdefault("train_loss", []).append(values["loss"])
            progress.update(step, values["loss"], tokens)
            if step % cfg.train.log_every == 0:
                self.tb.scalars(offset + step, {f"train/{k}": v for k, v in values.items()}
                                | {"train/tokens_per_second": progress.tokens_per_second})

        def on_eval(step, state):
            scores = evaluate_all(self.tasks, evaluators, state.params, ("validation",), self.backbone.mesh)
            self._last_validation = (index, step, state.params, dict(scores))
            if not self.single:  # the stage's own score: mean of its tasks' validation metrics
                own = [task_score(self.tasks, scores, t, ("validation",)) for t in stage.weights]
                if any(v is not None for v in own):
                    scores["validation/score"] = float(np.mean([v for v in own if v is not None]))
            self.tb.scalars(offset + step, scores)
            # Without a validation split there is nothing to select or stop on (R uses the test split).
            validated = any(k.startswith("validation/") for k in scores)
            # Selection needs the stage's own score: a stage whose tasks have no validation split
            # still records the other tasks' curves, but selects and stops on nothing.
            selectable = validated and (self.single or best.key in scores)
            improved, stop = best.update(step, scores) if selectable else (False, False)
            if guard is not None:
                stop = guard.update(step, scores, state.params) or stop
            warning = overfit.update(float(np.mean(train_losses)), scores, improved) if selectable else None
            train_losses.clear()
            if validated:
                _print(f"step {offset + step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items()))
                       + ("  (best so far)" if improved else ""))
                self.history.setdefault("evals", []).append({"step": step, "stage": index, **scores})
                self.history.setdefault("curves", []).append({"step": offset + step, "stage": index, "scores": {
                    t: task_score(self.tasks, scores, t, ("validation",)) for t in self.tasks.by_name}})
            if warning:
                _print(f"warning: step {offset + step}: {warning}")
                self.history.setdefault("overfit_warnings", []).append({"step": offset + step, "stage": index})
            early = stop and best.patience and best.bad_evals >= best.patience
            if early:
                self.history.setdefault("early_stops", []).append({"step": offset + step, "stage": index})
            if (step == sr.steps or stop) and guard is None and not self.keeps_best:
                # The stage ends on these weights: R's row goes into its last checkpoint, so a
                # resume or a branch from here does not evaluate the stage end again.
                self._take_row(sr, state.params, step, offset + step)
            self._save(sr, step, state, stopped=stop, metrics=scores)
            if early:
                _print(f"early stopping at step {offset + step}: no improvement in validation/"
                       f"{cfg.eval.metric if self.single else 'score'} for {best.patience} evals")
            return stop

        if jax.process_count() > 1:  # a collective, so only where every process saves anyway
            def interrupted(step):
                return step % cfg.checkpoint.every_steps == 0 and self.stop.requested_anywhere()
        else:
            def interrupted(step):
                return self.stop.requested
        state, last, _, signalled = fit(
            sr.step_fn, state, sr.train_iter, self.backbone.mesh, first=local + 1, last=sr.steps,
            eval_every=cfg.train.eval_every, save_every=cfg.checkpoint.every_steps, on_metrics=on_metrics,
            on_eval=on_eval, on_save=lambda step, st: self._save(sr, step, st), interrupted=interrupted)
        progress.close()
        self.ckpt.wait()
        if signalled:
            _print(self.stop.stopped_message(offset + last, str(self.ckpt.directory)))
            raise SystemExit(self.stop.exit_code)
        params = state.params
        if guard is not None:
            params = guard.result(state.params, sr)
        return state, params, last

    def finish_stage(self, sr: StageRun, state, params, last: int) -> tuple:
        """R's row for the stage (and, for a run that keeps its best, that checkpoint as the result);
        nothing to do where the row for this stage end is in the history already (taken at the
        stage's last eval, or before a kill, resume or branch)."""
        index = sr.stage.index
        final_step = self.offsets[index] + last
        if self.history.get("stage_ends", [])[index:index + 1] == [final_step]:
            return params, final_step
        best = self.ckpt.best_step()
        if self.keeps_best and best is not None and best != final_step:
            best_state, _, _ = self.restore(self.ckpt, sr, state, self.ckpt.read_extra(best), best)
            params, final_step = best_state.params, best
        self._take_row(sr, params, last, final_step)
        return params, final_step

    def _take_row(self, sr: StageRun, params, last: int, final_step: int) -> None:
        """Evaluates `params` as stage `sr`'s result after its local step `last`: R's row."""
        index = sr.stage.index
        evaluators, last_eval = self._evaluators(sr), self._last_validation
        if last_eval is not None and last_eval[:2] == (index, last) and last_eval[2] is params:
            # These very weights were evaluated on validation at the stage's last step: same scores.
            scores = last_eval[3] | evaluate_all(self.tasks, evaluators, params, ("test",), self.backbone.mesh)
        else:
            scores = evaluate_all(self.tasks, evaluators, params, ("validation", "test"), self.backbone.mesh)
        self.history["final"] = scores
        self.history["final_step"] = final_step
        # A resumed run that extends a finished stage replaces that stage's row.
        self.history["R"] = self.history.get("R", [])[:index] + [
            {t: task_score(self.tasks, scores, t) for t in self.tasks.by_name}]
        self.history["stage_ends"] = self.history.get("stage_ends", [])[:index] + [self.offsets[index] + last]
        # What a branch from this stage end checks its checkpoint against (None: a stage end of a
        # checkpoint written before digests were recorded).
        earlier = self.history.get("stage_digests", [])
        self.history["stage_digests"] = (earlier + [None] * index)[:index] + [params_digest(params)]
        self.tb.scalars(final_step, {f"final/{k}": v for k, v in scores.items()}
                        | {f"R/{t}": v for t, v in self.history["R"][-1].items() if v is not None})

    # -- the run -----------------------------------------------------------------------------
    def ranking(self) -> dict:
        """How checkpoints rank for keep_best: the task's metric, or a staged run's stage score."""
        return dict(best_metric="validation/" + (self.cfg.eval.metric if self.single else "score"),
                    best_mode=self.cfg.eval.mode)

    def run(self, stop: StopSignals, overwrite: bool = False) -> dict:
        """The whole run; a checkpoint save in flight completes (or is dropped quietly) on any exit.
        `overwrite`: with train.resume=false, replace an earlier run's files in place."""
        self.stop = stop
        with Checkpointer(self.cfg.checkpoint, self.cfg.checkpoint.resolved_dir(self.run_dir),
                          owner=self.run_dir, **self.ranking()) as self.ckpt:
            if not self.cfg.train.resume:
                self._start_over_in_place(overwrite)
            return self._run()

    def _start_over_in_place(self, overwrite: bool) -> None:
        """train.resume=false: nothing an earlier run wrote is overwritten unless asked explicitly."""
        earlier = [str(self.ckpt.directory)] if self.ckpt.latest_step() is not None else []
        earlier += [str(self.run_dir / name) for name in ("summary.json", "hf") if (self.run_dir / name).exists()]
        if not earlier:
            return
        if not overwrite:
            raise TenureError(f"run_dir {self.run_dir} holds an earlier run ({', '.join(earlier)}) and "
                              "train.resume=false would overwrite it: add --restart to move it aside first, or "
                              "--overwrite to replace it in place")
        self.ckpt.delete_all()  # every process: orbax coordinates the deletion
        _print(f"overwrite: starting over in {self.run_dir}; the earlier run's checkpoints are deleted")

    def _check_drift(self, meta: dict) -> None:
        """Refuse a resume whose config or labels changed in a way that breaks the run."""
        labels = self.tasks.label_vocab.to_json() if self.tasks.label_vocab else None
        breaking, notes = compare_for_resume(as_today(meta.get("config") or {}), to_dict(self.cfg),
                                             meta.get("labels"), labels)
        if breaking:
            raise TenureError(drift_message(breaking, str(self.run_dir)))
        for note in notes:
            _print(f"note: resume: {note}")

    def _branch(self, source: str) -> tuple:
        """(params, regulariser trees, next stage index) after the stages the finished run at
        `source` trained; this run's history starts as that run's."""
        labels = self.tasks.label_vocab.to_json() if self.tasks.label_vocab else None
        ckpt_dir, recorded = source_checkpoints(source)
        with Checkpointer(None, ckpt_dir, read_only=True) as ckpt:
            step = ckpt.latest_step()
            if step is None:
                raise TenureError(f"branch_from: {source}: no checkpoint in {ckpt.directory}")
            meta = ckpt.read_extra(step)
            done = check_branch(meta, self.cfg, labels, source)
            sr = self._build(done - 1, self.start_params, self._extra_shapes(done - 1), compute=False)
            sr.train_iter.close()
            state, _, extra = self.restore(ckpt, sr, sr.state, meta, step)
            check_stage_end(source, ckpt.step_dir(step), self.stages[done - 1].name, recorded[done - 1:done],
                            params_digest(state.params))
        local = int(extra["local_step"])
        if not (extra.get("stopped") or local >= sr.steps):
            raise TenureError(f"branch_from: {source}: its newest checkpoint (step {step}) is not the end of "
                              "its last stage; branch from a run that ran to its end")
        self.history = extra["history"]
        params, _ = self.finish_stage(sr, state, state.params, local)
        _print(f"branched from {source} after stage{'s' * (done > 1)} "
               f"{', '.join(s.name for s in self.stages[:done])} (checkpoint step {step})")
        return params, state.extra, done

    def _run(self) -> dict:
        cfg = self.cfg
        self.tb = run_loggers(cfg.logging, self.run_dir, to_dict(cfg), primary=distributed.is_primary())
        _print(f"model {self.backbone.model_dir}  tasks {', '.join(f'{n} ({t.task.spec.kind})' for n, t in self.tasks.by_name.items())}  "
               f"mesh {dict(self.backbone.mesh.shape)}  stages {len(self.stages)}")
        self.tb.text(0, "config", "```\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "\n```")
        params, previous_extra, begin, resumed = self.start_params, {}, 0, None
        if cfg.train.resume and self.ckpt.latest_step() is not None:
            meta = self.ckpt.read_extra(self.ckpt.latest_step())
            self._check_drift(meta)
            begin = int(meta.get("stage", 0))
            sr = self._build(begin, self.start_params, self._extra_shapes(begin), compute=False)
            state, data_state, extra = self.restore(self.ckpt, sr, sr.state, meta)
            self.history = extra["history"]
            local = int(extra["local_step"])
            if extra.get("stopped") or local >= sr.steps:
                sr.train_iter.close()
                params, _ = self.finish_stage(sr, state, state.params, local)
                previous_extra, begin = state.extra, begin + 1
            else:
                sr.train_iter.set_state(data_state)
                resumed = (sr, state, local)
            _print(f"resumed from step {extra['step']} ({self.ckpt.directory})")
        elif cfg.branch_from:
            params, previous_extra, begin = self._branch(cfg.branch_from)
        final_step = self.history.get("final_step", 0)
        for index in range(begin, len(self.stages)):
            if resumed is not None:
                sr, state, local = resumed
                resumed = None
            else:
                sr = self._build(index, params, previous_extra)
                state, local = sr.state, 0
            state, stage_params, last = self.run_stage(sr, state, local)
            params, final_step = self.finish_stage(sr, state, stage_params, last)
            previous_extra = state.extra
            sr.train_iter.close()
        return self.conclude(params, final_step)

    def conclude(self, params, final_step: int) -> dict:
        run_dir = self.run_dir
        export_dir = run_dir / "hf"
        host_params = self.frozen_base.full_precision(to_host(params))  # collective: every process takes part
        labels = [str(label) for label in self.tasks.label_vocab.labels] if self.tasks.label_vocab else None
        if distributed.is_primary():
            export_hf(export_dir, self.backbone.arch, host_params, head_of(self.tasks.first.task.spec.kind),
                      self.backbone.tokenizer, lora=self.lora, merge=True, labels=labels)
        self.tb.close()
        record = forgetting_record(list(self.tasks.by_name), [s.name for s in self.stages],
                                   {n: t.task.metric for n, t in self.tasks.by_name.items()},
                                   {n: t.task.mode for n, t in self.tasks.by_name.items()}, self.history,
                                   {n: r_split(t.task) for n, t in self.tasks.by_name.items()})
        # Paths relative to the run dir: a run moved with `mv` stays whole (issue 25).
        summary = {"baseline": self.history.get("baseline", {}), "final": self.history["final"],
                   "train_loss": self.history.get("train_loss", []), "best_step": final_step,
                   "tensorboard": "tb", "checkpoints": os.path.relpath(self.ckpt.directory, run_dir.absolute()),
                   "hf_export": "hf", "stage_digests": self.history.get("stage_digests", []),
                   "R": record["R"], "forgetting": record.get("summary"),
                   # the validation evals (scores, validation/generalization_gap) and what the monitors did
                   "evals": self.history.get("evals", []), "stage_ends": self.history.get("stage_ends", []),
                   "early_stops": self.history.get("early_stops", []),
                   "overfit_warnings": self.history.get("overfit_warnings", [])}
        if distributed.is_primary():
            atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
            write_forgetting(run_dir, record)
            names = sorted(k for k in self.history["final"] if k.startswith("test/"))
            if names:
                _print("\n" + _table(names, {"pretrained + fresh head": summary["baseline"],
                                             f"fine-tuned (step {final_step})": summary["final"]}))
            if len(self.stages) == 1 and not self.single:
                _print("\n" + start_end_table(record, list(self.stages[0].weights)))
            elif not self.single:
                _print("\naccuracy matrix R (rows: after each stage; columns: tasks)\n" + r_table(record))
            _print(f"\nTensorBoard: tensorboard --logdir {run_dir / 'tb'}\n"
                   f"checkpoints: {self.ckpt.directory}\nHF export:   {export_dir}\n"
                   f"forgetting:  {run_dir / 'forgetting.json'} (.csv, .png)")
        return summary


class _Guard:
    """A forgetting budget: the guarded tasks' validation metric may drop at most `max_drop` below
    its value at the start of the stage. The stage keeps its best weights (by its own score) among
    the evals within budget, and stops after `patience` evals out of budget in a row."""

    def __init__(self, stage: Stage, trainer: Trainer, evaluators, params):
        self.stage, self.trainer = stage, trainer
        self.names = guarded_tasks(stage.guard)
        scores = evaluate_all(trainer.tasks, evaluators, params, ("validation",), trainer.backbone.mesh,
                              only=self.names)
        self.start = {t: task_score(trainer.tasks, scores, t, ("validation",)) for t in self.names}
        self.best_score, self.best_step, self.best_params, self.out = None, None, None, 0

    def within(self, scores) -> bool:
        for t in self.names:
            value = task_score(self.trainer.tasks, scores, t, ("validation",))
            drop = (self.start[t] - value) if self.trainer.tasks.by_name[t].task.mode == "max" else (value - self.start[t])
            if drop > self.stage.guard.max_drop:
                return False
        return True

    def update(self, step: int, scores: dict, params) -> bool:
        if self.within(scores):
            self.out = 0
            if self.best_score is None or scores["validation/score"] > self.best_score:
                self.best_score, self.best_step = scores["validation/score"], step
                self.best_params = jax.tree.map(np.asarray, jax.device_get(params))
            return False
        self.out += 1
        if self.out >= self.stage.guard.patience:
            _print(f"guard: {', '.join(self.names)} out of budget (max_drop {self.stage.guard.max_drop}) "
                   f"for {self.out} evals; stopping the stage")
            return True
        return False

    def result(self, params, sr: StageRun):
        if self.best_params is None:
            _print("guard: no eval stayed within the budget; the stage ends with its last weights")
            return params
        _print(f"guard: keeping step {self.trainer.offsets[sr.stage.index] + self.best_step} "
               f"(best {self.best_score:.4f} within budget)")
        return jax.device_put(self.best_params, sr.state_shardings.params)


def train(cfg: Config, restart: bool = False, overwrite: bool = False) -> dict:
    """Runs the config's stages; returns the summary it also prints and writes. One run per run
    dir, and per checkpoint dir (locks); `restart` moves an earlier run's files aside first,
    its checkpoint dir too wherever it is (nothing is deleted); `overwrite` lets
    train.resume=false replace them in place."""
    distributed.initialize()
    from tenure.engine.tools.preflight import require
    require(cfg)  # mesh and batch (multi-host: also collectives, data and checkpoint dir) checked first
    ckpt_dir = cfg.checkpoint.resolved_dir(cfg.run_dir)
    outside = not is_inside(ckpt_dir, cfg.run_dir)
    with contextlib.ExitStack() as held:
        held.enter_context(RunLock(cfg.run_dir, process_index=jax.process_index(), log=_print))
        if outside:  # a checkpoint dir inside the run dir is covered by the run dir's lock
            problem = directory_problem(ckpt_dir)  # a user's folder gets no lock file either
            if problem:
                raise TenureError(problem)
            held.enter_context(RunLock(ckpt_dir, process_index=jax.process_index(), log=_print,
                                       what="checkpoint.dir"))
        stop = held.enter_context(StopSignals())
        if restart:
            if distributed.is_primary():
                for directory, what in [(cfg.run_dir, "run_dir")] + [(ckpt_dir, "checkpoint.dir")] * outside:
                    moved = set_aside_run(directory, what)
                    if moved:
                        _print(f"restart: the earlier run's {what} is now {moved}")
            multihost_utils.sync_global_devices("tenure_restart")
        return Trainer(cfg).run(stop, overwrite=overwrite)
