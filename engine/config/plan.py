"""A run's plan: the config resolved once (engine/config/stages.py) into its tasks, its stages
and what each stage computes. Validation resolves it and it is kept while the config lives: configs
are frozen, so a plan never goes stale, and every later `plan(cfg)` (preflight, Trainer, assembly,
branch check) reads it instead of resolving again. A copy (`model_copy`) is another config."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from pydantic import BaseModel

from tenure.engine.config.stages import Stage, Task, ewc_on, fisher_tasks, kl_on, l2sp_on, replayed_tasks, resolve
from tenure.models.errors import TenureError


@dataclass(frozen=True)
class RunPlan:
    tasks: dict[str, Task]  # by name, in training order
    stages: list[Stage]
    computed: list[dict]    # per stage, what it computes (JSON): checkpoints record it, a branch compares it
    # ends on its best validation checkpoint, not its last weights: a single-task run, or one stage
    # beside tasks it only evaluates (the quickstart) with checkpoint.keep_best
    ends_on_best: bool

    @property
    def trained(self) -> list[str]:
        """The tasks some stage trains, in the order they are first trained."""
        return list(dict.fromkeys(t for s in self.stages for t in s.weights))


_PLANS: dict[int, RunPlan] = {}  # id(config) -> its plan, dropped when the config is


def plan(cfg) -> RunPlan:
    key = id(cfg)
    if key not in _PLANS:
        _PLANS[key] = _resolved(cfg)
        weakref.finalize(cfg, _PLANS.pop, key, None)
    return _PLANS[key]


def _resolved(cfg) -> RunPlan:
    tasks, stages = resolve(cfg)
    if len({s.trainable.mode == "lora" for s in stages}) > 1:
        raise TenureError("stages: LoRA changes the parameter tree, so either every stage or none uses "
                          "trainable.mode=lora")
    if cfg.model.init == "random":  # the run's starting weights are random: nothing to stay near or distil from
        for s in stages:
            for name, on in (("l2sp", l2sp_on(s)), ("kl", kl_on(s))):
                if on and getattr(s, name).anchor == "pretrained":
                    raise TenureError(f"stage {s.index}: {name}.anchor=pretrained with model.init=random anchors "
                                      f"to the random initial weights; set {name}.anchor=stage_start")
    single = len(stages) == 1 and len(tasks) == 1
    ends_on_best = single or (len(stages) == 1 and stages[0].guard is None and cfg.checkpoint.keep_best)
    if ends_on_best and not cfg.checkpoint.enabled:
        raise TenureError("config key 'checkpoint.enabled': false, but this run ends on its best validation "
                          "checkpoint (" + ("a single-task run" if single else "checkpoint.keep_best")
                          + "), which it would not have")
    return RunPlan(tasks, stages, [_computed(s, stages) for s in stages], ends_on_best)


def _computed(stage: Stage, stages: list[Stage]) -> dict:
    """What the stage computes: its fields, with the regularisers that act on nothing left out.
    Whether a regulariser is on depends on whether its strength was set, which a full dict of
    the config no longer tells."""
    plain = {k: (v.model_dump(mode="json", by_alias=True) if isinstance(v, BaseModel) else v)
             for k, v in vars(stage).items()}
    plain["weights"] = dict(stage.weights)
    plain["earlier"] = list(stage.earlier)
    has_fisher = any(ewc_on(s) and fisher_tasks(stages, s.index) for s in stages[:stage.index + 1])
    if not (ewc_on(stage) and has_fisher):
        plain["ewc"] = None
    if not l2sp_on(stage):
        plain["l2sp"] = None
    if not replayed_tasks(stage):
        plain["replay"] = None
    if not kl_on(stage):
        del plain["kl"]  # as in records made before the KL term existed
    return plain
