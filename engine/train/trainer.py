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

Here: what the run shares (Trainer) and its order (resume / branch, stages, summary); one
stage is engine/train/runner.py, what fit calls during it engine/train/hooks.py.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import yaml
from jax.experimental import multihost_utils

from tenure.engine.config.schema import Config, as_today, to_dict
from tenure.engine.config.plan import plan
from tenure.engine.config.stages import SINGLE_TASK, r_split, score_mode
from tenure.engine.continual.branch import check_branch, check_stage_end, source_checkpoints
from tenure.engine.continual.report import forgetting_record, r_table, start_end_table, write_forgetting
from tenure.engine.continual.stage_regularizers import regularizers
from tenure.engine.data.sources import files_digest
from tenure.engine.runtime import atomic, distributed
from tenure.engine.runtime.checkpoint import Checkpointer, directory_problem, nonfinite_leaves
from tenure.engine.runtime.distributed import print_primary
from tenure.engine.runtime.loggers import run_loggers
from tenure.engine.runtime.resume_check import compare_for_resume, drift_message
from tenure.engine.runtime.runlock import RunLock, is_inside, set_aside_run
from tenure.engine.runtime.signals import StopSignals
from tenure.engine.tasks.evaluate import make_evaluators
from tenure.engine.tasks.kl_start import KLToStart
from tenure.engine.train.build import (Backbone, StageRun, Tasks, build_backbone, build_stage, build_tasks, eval_models,
                                       lora_spec, start_params)
from tenure.engine.train.history import RunHistory
from tenure.engine.train.params import abstract, params_digest, to_host
from tenure.engine.train.runner import StageRunner
from tenure.engine.train.trainability import compile_trainability
from tenure.models.errors import TenureError
from tenure.models.hf import export_hf
from tenure.engine.tasks.kinds import KINDS


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
    """What every stage shares (backbone, tasks, starting params); builds, restores and evaluates
    a stage's run (also for `tenure eval`, `export`, `interpolate` and lm-eval); `run` trains."""

    def __init__(self, cfg: Config, *, keep_pretrained_head: bool = False):
        """`keep_pretrained_head`: the model directory's task head is the model (evaluating an export)."""
        self.cfg = cfg
        self.run_dir = pathlib.Path(cfg.run_dir)
        self.plan = plan(cfg)
        self.stages = self.plan.stages
        self.backbone: Backbone = build_backbone(cfg)
        self.tasks: Tasks = build_tasks(cfg, self.backbone, self.plan.tasks, trained=self.plan.trained)
        self.lora = lora_spec(self.stages[0].trainable)
        self.start_params, self.param_shardings, self.frozen_base = start_params(
            cfg, self.stages, self.backbone, self.tasks, keep_pretrained_head=keep_pretrained_head)
        self.single = len(self.stages) == 1 and not self.tasks.multi
        self.keeps_best = self.plan.ends_on_best
        self.offsets = [sum(s.steps or 0 for s in self.stages[:i]) for i in range(len(self.stages))]
        self._stage_evaluators: dict[int, tuple] = {}  # stage index -> (its StageRun, evaluators, KL measure)

    def labels_json(self):
        return self.tasks.label_vocab.to_json() if self.tasks.label_vocab else None

    @functools.cached_property  # read once: the saver's extras and a resume's drift check both use it
    def training_data(self) -> dict[str, str]:
        """{config key of each trained task's training files: their digest}, saved with every
        checkpoint: a resume counts its data position in those files, so it must read the same."""
        digests = {}
        for name, run_task in self.tasks.by_name.items():
            train = run_task.task.data.train if run_task.task.data else None
            if train is None:
                continue
            key = "data.train" if name == SINGLE_TASK else f"tasks.{name}.data.train"
            sources = {f"{key}.{source}.path": config.path for source, config in train.items()} \
                if isinstance(train, dict) else {key: train}
            digests.update((where, files_digest(paths)) for where, paths in sources.items())
        return digests

    # -- a stage's run -----------------------------------------------------------------------
    def _regularize(self, index: int, params, previous_extra: dict, compute: bool):
        def regularize(trainability, model):
            return regularizers(self.cfg, self.stages, index, self.backbone, self.tasks, trainability, params,
                                self.param_shardings, self.start_params, previous_extra,
                                models=self._models(model) if compute else None, model=model)
        return regularize

    def extra_shapes(self, upto: int) -> dict:
        """The regulariser trees stage `upto` starts with, as zeros (a checkpoint's restore target)."""
        extra = {}
        for index in range(upto):
            stage = self.stages[index]
            trainability = compile_trainability(self.start_params, stage.trainable,
                                                num_layers=self.backbone.arch.num_layers)
            _, extra = regularizers(self.cfg, self.stages, index, self.backbone, self.tasks, trainability,
                                    self.start_params, self.param_shardings, self.start_params, extra)
        return extra

    def build(self, index: int, params, previous_extra: dict, compute: bool = True) -> StageRun:
        """Stage `index`'s run from `params` and the regulariser trees of the stages before it;
        `compute=False`: those trees are not computed (a restore fills them)."""
        if params is self.start_params:  # the train step donates its state; the start params stay
            params = jax.tree.map(jnp.copy, params)
        return build_stage(self.cfg, self.stages[index], self.backbone, self.tasks, params, self.param_shardings,
                           regularize=self._regularize(index, params, previous_extra, compute))

    def build_for_restore(self, index: int) -> StageRun:
        """Stage `index`'s run as a restore target of its checkpoints (nothing computed)."""
        return self.build(index, self.start_params, self.extra_shapes(index), compute=False)

    def restore(self, ckpt: Checkpointer, sr: StageRun, like, meta: dict, step: int) -> tuple:
        """(state, data state, extras) of checkpoint `step` of stage run `sr`, whose extras are
        `meta`; `like` is a state of that stage, which gives the frozen leaves a checkpoint leaves
        out (engine/train/frozen_base.py)."""
        where = str(ckpt.step_dir(step))
        target = self.frozen_base.target(abstract(like, sr.state_shardings), meta, where)
        stored, data_state, extra = self._checked(ckpt, meta, where, lambda: ckpt.restore(step, target))
        return self.frozen_base.joined(stored, like.params), data_state, extra

    def restore_newest(self, ckpt: Checkpointer, meta: dict) -> tuple:
        """(stage run, state, data state, extras) of the newest checkpoint that reads back (`meta`:
        the newest readable extras). Its stage is the one its own extras name: where the newest
        step's arrays are broken, the one restored may belong to an earlier stage."""
        runs = {}  # stage index -> the stage run whose state is the restore target

        def target(extra: dict):
            index = int(extra.get("stage", 0))
            if index not in runs:
                runs[index] = self.build_for_restore(index)
            return self.frozen_base.target(abstract(runs[index].state, runs[index].state_shardings), extra,
                                           str(ckpt.directory))

        stored, data_state, extra = self._checked(ckpt, meta, str(ckpt.directory),
                                                  lambda: ckpt.restore_latest_good(target, log=print_primary))
        sr = runs.pop(int(extra.get("stage", 0)))
        for unused in runs.values():
            unused.train_iter.close()
        return sr, self.frozen_base.joined(stored, sr.state.params), data_state, extra

    def _checked(self, ckpt: Checkpointer, meta: dict, where: str, read) -> tuple:
        """`read()`'s (stored state, data state, extras), or one line on what is wrong with them."""
        try:
            stored, data_state, extra = read()
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
        return stored, data_state, extra

    def _models(self, model) -> dict:
        return eval_models(self.cfg, self.backbone, self.tasks, model, self.lora)

    def _stage_measures(self, sr: StageRun) -> tuple:
        """(its StageRun, evaluators, KL-to-start measure or None), built once per stage run (each
        jitted step compiles once)."""
        built = self._stage_evaluators.get(sr.stage.index)
        if built is None or built[0] is not sr:
            models = self._models(sr.model)
            kl = (KLToStart(self.tasks, list(sr.stage.weights), models, self.start_params, self.backbone.mesh,
                            sr.state_shardings.params, self.lora.scale if self.lora is not None else None)
                  if self.cfg.eval.kl_to_start else None)
            built = (sr, make_evaluators(self.tasks, models, self.backbone.mesh, sr.state_shardings.params,
                                         self.backbone.tokenizer, progress=self.cfg.logging.progress), kl)
            self._stage_evaluators[sr.stage.index] = built
        return built

    def evaluators(self, sr: StageRun):
        """The stage's evaluators, built once per stage run."""
        return self._stage_measures(sr)[1]

    def kl_start(self, sr: StageRun):
        """The stage's KL-to-start measure (`eval.kl_to_start`), else None."""
        return self._stage_measures(sr)[2]

    def ranking(self) -> dict:
        """How checkpoints rank for keep_best: the task's metric, or a staged run's stage score."""
        modes = (self.tasks.by_name[t].task.mode for stage in self.stages for t in stage.weights)
        return dict(best_metric="validation/" + (self.cfg.eval.metric if self.single else "score"),
                    best_mode=score_mode(modes, self.cfg.eval.mode))

    # -- the run -----------------------------------------------------------------------------
    def run(self, stop: StopSignals, overwrite: bool = False) -> dict:
        """The whole run; a checkpoint save in flight completes (or is dropped quietly) on any exit.
        `overwrite`: replace an earlier run's files in place when this run starts over (train.resume=false,
        or no checkpoint to resume from)."""
        with Checkpointer(self.cfg.checkpoint, self.cfg.checkpoint.resolved_dir(self.run_dir),
                          owner=self.run_dir, **self.ranking()) as ckpt:
            if not self.cfg.train.resume or ckpt.latest_step() is None:
                self._start_over_in_place(ckpt, overwrite)
            tb = run_loggers(self.cfg.logging, self.run_dir, to_dict(self.cfg), primary=distributed.is_primary())
            runner = StageRunner(self, ckpt, tb, stop, RunHistory())
            params, final_step = self._stages(runner)
            return self._conclude(runner, params, final_step)

    def _start_over_in_place(self, ckpt: Checkpointer, overwrite: bool) -> None:
        """A run that starts at step 0 (train.resume=false, or no checkpoint in its checkpoint dir, e.g.
        deleted or checkpoint.dir changed): nothing an earlier run wrote is overwritten unless asked."""
        earlier = [str(ckpt.directory)] if ckpt.latest_step() is not None else []
        earlier += [str(self.run_dir / name) for name in ("summary.json", "forgetting.json", "hf")
                    if (self.run_dir / name).exists()]
        if not earlier:
            return
        if not overwrite:
            why = ("train.resume=false would overwrite it" if not self.cfg.train.resume else
                   f"there is no checkpoint to resume from in {ckpt.directory}, so starting over would overwrite it")
            raise TenureError(f"run_dir {self.run_dir} holds an earlier run ({', '.join(earlier)}) and {why}: "
                              "add --restart to move it aside first, or --overwrite to replace it in place")
        ckpt.delete_all()  # every process: orbax coordinates the deletion
        print_primary(f"overwrite: starting over in {self.run_dir}; the earlier run's checkpoints are deleted")

    def _check_drift(self, meta: dict) -> None:
        """Refuse a resume whose config, labels or training files changed in a way that breaks the run."""
        breaking, notes = compare_for_resume(as_today(meta.get("config") or {}), to_dict(self.cfg),
                                             meta.get("labels"), self.labels_json(),
                                             stopped_stage=int(meta.get("stage", 0)) if meta.get("stopped") else None)
        saved = meta.get("training_data") or {}  # absent from checkpoints written before it was recorded
        breaking += [f"{key}: its files changed since the checkpoint (the data position the run resumes at "
                     "counts in the old files)" for key, digest in self.training_data.items()
                     if key in saved and saved[key] != digest]
        if breaking:
            raise TenureError(drift_message(breaking, str(self.run_dir)))
        for note in notes:
            print_primary(f"note: resume: {note}")

    def _resume(self, runner: StageRunner) -> tuple:
        """(params, regulariser trees, next stage index, the stage run to continue or None) from
        the run's newest checkpoint; the history continues the checkpoint's."""
        ckpt = runner.ckpt
        meta = ckpt.latest_readable_extra(print_primary)
        self._check_drift(meta)
        sr, state, data_state, extra = self.restore_newest(ckpt, meta)
        begin = sr.stage.index
        runner.history = RunHistory.from_dict(extra["history"])
        local = int(extra["local_step"])
        if extra.get("stopped") or local >= sr.steps:
            sr.train_iter.close()
            # a guarded stage's result is its guard's pick (replayed from the history), not its last weights
            params, _ = runner.finish_stage(sr, state, local, runner.guard(sr, state))
            resumed = params, state.extra, begin + 1, None
        else:
            sr.train_iter.set_state(data_state)
            resumed = self.start_params, {}, begin, (sr, state, local)
        print_primary(f"resumed from step {extra['step']} ({ckpt.directory})")
        return resumed

    def _branch(self, runner: StageRunner, source: str) -> tuple:
        """(params, regulariser trees, next stage index) after the stages the finished run at
        `source` trained; this run's history starts as that run's."""
        ckpt_dir, recorded = source_checkpoints(source)
        with Checkpointer(None, ckpt_dir, read_only=True) as ckpt:
            step = ckpt.latest_step()
            if step is None:
                raise TenureError(f"branch_from: {source}: no checkpoint in {ckpt.directory}")
            meta = ckpt.read_extra(step)
            done = check_branch(meta, self.cfg, self.plan.computed, self.labels_json(), source)
            sr = self.build_for_restore(done - 1)
            sr.train_iter.close()
            state, _, extra = self.restore(ckpt, sr, sr.state, meta, step)
            check_stage_end(source, ckpt.step_dir(step), self.stages[done - 1].name, recorded[done - 1:done],
                            params_digest(state.params))
        local = int(extra["local_step"])
        if not (extra.get("stopped") or local >= sr.steps):
            raise TenureError(f"branch_from: {source}: its newest checkpoint (step {step}) is not the end of "
                              "its last stage; branch from a run that ran to its end")
        runner.history = RunHistory.from_dict(extra["history"])
        params, _ = runner.finish_stage(sr, state, local)
        print_primary(f"branched from {source} after stage{'s' * (done > 1)} "
                      f"{', '.join(s.name for s in self.stages[:done])} (checkpoint step {step})")
        return params, state.extra, done

    def _stages(self, runner: StageRunner) -> tuple:
        """Runs the stages not done yet (after a resume or a branch): (the result params, its step)."""
        cfg = self.cfg
        print_primary(f"model {self.backbone.model_dir}  tasks "
                      f"{', '.join(f'{n} ({t.task.spec.kind})' for n, t in self.tasks.by_name.items())}  "
                      f"mesh {dict(self.backbone.mesh.shape)}  compute {cfg.model.dtype}  stages {len(self.stages)}")
        runner.tb.text(0, "config", "```\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "\n```")
        params, previous_extra, begin, resumed = self.start_params, {}, 0, None
        if cfg.train.resume and runner.ckpt.latest_step() is not None:
            params, previous_extra, begin, resumed = self._resume(runner)
        elif cfg.branch_from:
            params, previous_extra, begin = self._branch(runner, cfg.branch_from)
        final_step = runner.history.final_step or 0
        for index in range(begin, len(self.stages)):
            if resumed is not None:
                (sr, state, local), resumed = resumed, None
            else:
                sr = self.build(index, params, previous_extra)
                state, local = sr.state, 0
            state, guard, last = runner.run_stage(sr, state, local)
            params, final_step = runner.finish_stage(sr, state, last, guard)
            previous_extra = state.extra
            sr.train_iter.close()
        return params, final_step

    def _conclude(self, runner: StageRunner, params, final_step: int) -> dict:
        """The HF export, summary.json and forgetting.json/csv/png of the finished run."""
        export_dir = self.run_dir / "hf"
        host_params = self.frozen_base.full_precision(to_host(params))  # collective: every process takes part
        labels = [str(label) for label in self.tasks.label_vocab.labels] if self.tasks.label_vocab else None
        if distributed.is_primary():
            export_hf(export_dir, self.backbone.arch, host_params, KINDS[self.tasks.first.task.spec.kind].head,
                      self.backbone.tokenizer, lora=self.lora, merge=True, labels=labels)
        runner.tb.close()
        history = runner.history.to_dict()
        by_name = self.tasks.by_name
        record = forgetting_record(list(by_name), [s.name for s in self.stages],
                                   {n: t.task.metric for n, t in by_name.items()},
                                   {n: t.task.mode for n, t in by_name.items()}, history,
                                   {n: r_split(t.task) for n, t in by_name.items()},
                                   [list(s.weights) for s in self.stages])
        summary = _summary(history, record, final_step, os.path.relpath(runner.ckpt.directory, self.run_dir.absolute())
                           if self.cfg.checkpoint.enabled else None)
        if distributed.is_primary():
            atomic.write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            write_forgetting(self.run_dir, record)
            self._print_results(summary, record, final_step, runner.ckpt.directory)
        return summary

    def _print_results(self, summary: dict, record: dict, final_step: int, ckpt_dir) -> None:
        names = sorted(k for k in summary["final"] if k.startswith("test/"))
        if names:
            print_primary("\n" + _table(names, {"pretrained + fresh head": summary["baseline"],
                                                f"fine-tuned (step {final_step})": summary["final"]}))
        if len(self.stages) == 1 and not self.single:
            print_primary("\n" + start_end_table(record, list(self.stages[0].weights)))
        elif not self.single:
            print_primary("\naccuracy matrix R (rows: after each stage; columns: tasks)\n" + r_table(record))
        print_primary(f"\nTensorBoard: tensorboard --logdir {self.run_dir / 'tb'}\n"
                      f"checkpoints: {ckpt_dir if self.cfg.checkpoint.enabled else 'none (checkpoint.enabled=false)'}\n"
                      f"HF export:   {self.run_dir / 'hf'}\n"
                      f"forgetting:  {self.run_dir / 'forgetting.json'} (.csv, .png)")


def _summary(history: dict, record: dict, final_step: int, checkpoints: str | None) -> dict:
    """summary.json; paths relative to the run dir: a run moved with `mv` stays whole (issue 25)."""
    return {"baseline": history.get("baseline", {}), "final": history["final"],
            "train_loss": history.get("train_loss", []), "best_step": final_step,
            "tensorboard": "tb", "checkpoints": checkpoints,
            "hf_export": "hf", "stage_digests": history.get("stage_digests", []),
            "R": record["R"], "forgetting": record.get("summary"),
            # the validation evals (scores, validation/generalization_gap) and what the monitors did
            "evals": history.get("evals", []), "stage_ends": history.get("stage_ends", []),
            "early_stops": history.get("early_stops", []),
            "overfit_warnings": history.get("overfit_warnings", [])}


def _locked(held: contextlib.ExitStack, cfg: Config) -> None:
    """Holds the run dir's lock, and the checkpoint dir's where it lies outside the run dir."""
    ckpt_dir = cfg.checkpoint.resolved_dir(cfg.run_dir)
    held.enter_context(RunLock(cfg.run_dir, process_index=jax.process_index(), log=print_primary))
    if not is_inside(ckpt_dir, cfg.run_dir):  # inside, the run dir's lock covers it
        problem = directory_problem(ckpt_dir)  # a user's folder gets no lock file either
        if problem:
            raise TenureError(problem)
        held.enter_context(RunLock(ckpt_dir, process_index=jax.process_index(), log=print_primary,
                                   what="checkpoint.dir"))


def _set_aside(cfg: Config) -> None:
    """--restart: the earlier run's run dir (and checkpoint dir, wherever it is) moved aside."""
    ckpt_dir = cfg.checkpoint.resolved_dir(cfg.run_dir)
    outside = not is_inside(ckpt_dir, cfg.run_dir)
    if distributed.is_primary():
        for directory, what in [(cfg.run_dir, "run_dir")] + [(ckpt_dir, "checkpoint.dir")] * outside:
            moved = set_aside_run(directory, what)
            if moved:
                print_primary(f"restart: the earlier run's {what} is now {moved}")
    multihost_utils.sync_global_devices("tenure_restart")


def train(cfg: Config, restart: bool = False, overwrite: bool = False) -> dict:
    """Runs the config's stages; returns the summary it also prints and writes. One run per run
    dir, and per checkpoint dir (locks); `restart` moves an earlier run's files aside first,
    its checkpoint dir too wherever it is (nothing is deleted); `overwrite` lets
    train.resume=false replace them in place."""
    distributed.initialize()
    from tenure.engine.tools.preflight import require
    require(cfg)  # mesh and batch (multi-host: also collectives, data and checkpoint dir) checked first
    with contextlib.ExitStack() as held:
        _locked(held, cfg)
        stop = held.enter_context(StopSignals())
        if restart:
            _set_aside(cfg)
        return Trainer(cfg).run(stop, overwrite=overwrite)
