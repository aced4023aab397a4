"""Continual runs in config: named `tasks:`, a list of `stages:`, and the regularisers a stage
uses to keep what earlier stages learned (EWC, L2-SP, replay, a forgetting guard).

A config without `stages:` is one stage training its one task (`task:` + `data:`), so every
single-task config is a continual run of length one. `resolve(cfg)` turns either form into
the same `(tasks, stages)` with every stage field filled from the top-level defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tenure.engine.data.config import DataConfig
from tenure.engine.continual.fisher import FISHER_MODES
from tenure.engine.tasks.kinds import KINDS, LOWER_IS_BETTER, TaskKind, pack_error
from tenure.engine.train.optim import OptimConfig
from tenure.engine.train.trainability import TrainableConfig
from tenure.models.errors import TenureError

SINGLE_TASK = "task"  # the task name of a config without `tasks:`


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EWCConfig(_Section):
    lam: float = Field(0.0, ge=0, alias="lambda",
                       description="EWC strength: loss += (lambda/2) * sum_i F_i (theta_i - theta*_i)^2; 0 = off")
    fisher: Literal[FISHER_MODES] = Field(
        "exact", description="exact: sum over classes weighted by p; sampled: y ~ model; empirical: data labels; "
                             "batched: squared mini-batch gradient (a wrong control for studies)")
    examples: int = Field(512, ge=1, description="examples of each Fisher task the diagonal Fisher is averaged over")
    gamma: float = Field(1.0, ge=0, le=1, description="online EWC decay: F <- gamma * F + F_new")
    tasks: list[str] | None = Field(
        None, description="tasks whose data and objective give the Fisher; null = the previous stage's tasks")


class L2SPConfig(_Section):
    alpha: float = Field(0.0, ge=0, description="L2-SP strength: loss += (alpha/2) ||theta - theta0||^2; 0 = off")
    anchor: Literal["pretrained", "stage_start"] = Field(
        "pretrained", description="theta0: the pretrained weights, or the weights this stage starts from")


class ReplayConfig(_Section):
    ratio: float = Field(0.0, ge=0, lt=1, description="share of every batch drawn from earlier stages' tasks; 0 = off")
    buffer: int | None = Field(None, ge=1, description="per earlier task, a reservoir sample of this many "
                                                       "training records; null = the whole old training set")
    loss: Literal["mean", "separate"] = Field(
        "mean", description="mean: one mean over all examples of the batch (token kinds: labelled tokens), new "
                            "and replayed alike, so the ratio is also the replayed share of the loss; separate: "
                            "mean(new) + weight x mean over the earlier tasks of their replayed examples' mean "
                            "(the form before; each replayed example then weighs weight (1-r)/r new ones)")
    weight: float = Field(1.0, ge=0, description="loss weight of the replay term under replay.loss=separate; "
                                                 "with mean every example weighs 1 and other values are refused")
    tasks: list[str] | None = Field(
        None, description="tasks replayed; null = every earlier stage's task. Naming a task no stage trains "
                          "replays general data (e.g. general text mixed into an LLM's fine-tune)")

    @model_validator(mode="after")
    def _weight_needs_separate(self):
        if self.weight != 1.0 and self.loss != "separate":
            raise ValueError(f"replay.weight={self.weight} applies only with replay.loss: separate (with the "
                             "default 'mean' every example weighs the same and the replayed share of the loss "
                             "is replay.ratio)")
        return self


class KLConfig(_Section):
    weight: float = Field(0.0, ge=0, description="distillation toward the starting model (LwF; the KL-to-base term "
                                                 "of LLM fine-tuning): loss += weight x KL(p_start(.|x) || "
                                                 "p_theta(.|x)) on the stage's own tasks' inputs; 0 = off")
    anchor: Literal["stage_start", "pretrained"] = Field(
        "stage_start", description="the starting model: the weights this stage starts from (LwF), or the "
                                   "pretrained ones (KL to the base model)")


class GuardConfig(_Section):
    task: str | list[str] = Field(description="earlier task(s) whose validation metric the stage may not drop")
    max_drop: float = Field(description="largest allowed drop below the metric at the start of the stage")
    patience: int = Field(3, ge=1, description="evals out of budget in a row before the stage stops early")


class StageConfig(_Section):
    name: str | None = Field(None, description="stage name; default: its task names joined by '+'")
    tasks: list[str] | dict[str, float] = Field(
        description="task(s) trained in this stage; a mapping gives loss weights (multi-task: L_new + w * L_old)")
    steps: int = Field(ge=1, description="optimizer steps of this stage")
    trainable: TrainableConfig | None = Field(None, description="trainability of this stage: keys set here override the top-level section's; null = that section")
    optim: OptimConfig | None = Field(None, description="optimizer and schedule (fresh warmup): keys set here override the top-level section's; null = that section")
    ewc: EWCConfig | None = Field(None, description="keys set here override the top-level ewc section's; null = that section")
    l2sp: L2SPConfig | None = Field(None, description="keys set here override the top-level l2sp section's; null = that section")
    replay: ReplayConfig | None = Field(None, description="keys set here override the top-level replay section's; null = that section")
    kl: KLConfig | None = Field(None, description="keys set here override the top-level kl section's; null = that section")
    guard: GuardConfig | None = Field(None, description="forgetting budget on earlier tasks; null = none")

    @field_validator("tasks")
    @classmethod
    def _some(cls, value):
        if not value:
            raise ValueError("a stage needs at least one task")
        return value


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a run: what it is (kind, head options), its data, and the metric R records."""
    name: str
    spec: object        # the TaskConfig fields (kind, pooling, ...)
    data: DataConfig
    metric: str
    mode: str           # "max" or "min"

    @property
    def kind(self) -> TaskKind:
        return KINDS[self.spec.kind]


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    name: str
    weights: dict[str, float]   # task -> loss weight
    steps: int | None           # None: one pass of the data (single-task configs with num_epochs)
    trainable: TrainableConfig
    optim: OptimConfig
    ewc: EWCConfig
    l2sp: L2SPConfig
    replay: ReplayConfig
    guard: GuardConfig | None
    earlier: tuple[str, ...]    # tasks trained in stages before this one, in order
    kl: KLConfig = dataclasses.field(default_factory=KLConfig)


# A regulariser is on when its strength is above 0 or set explicitly (`ewc.lambda=0` runs the
# whole machinery with a zero penalty: the null-equivalence tests rely on that).
def ewc_on(stage: Stage) -> bool:
    return stage.ewc.lam > 0 or "lam" in stage.ewc.model_fields_set


def kl_on(stage: Stage) -> bool:
    return stage.kl.weight > 0 or "weight" in stage.kl.model_fields_set


def l2sp_on(stage: Stage) -> bool:
    return stage.l2sp.alpha > 0 or "alpha" in stage.l2sp.model_fields_set


def fisher_tasks(stages: list[Stage], index: int) -> list[str]:
    stage = stages[index]
    if stage.ewc.tasks is not None:
        return list(stage.ewc.tasks)
    return list(stages[index - 1].weights) if index > 0 else []


def _merged(base: dict, over: dict) -> dict:
    return {**base, **{k: _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def _inherit(top: BaseModel, own: BaseModel | None, key: str) -> BaseModel:
    """A stage's section (config key `key`) over the top-level one: the keys the stage sets, the top
    level's for the rest (`stages.1.optim={lr: 1e-4}` keeps the top-level optimizer, schedule and warm-up)."""
    if own is None:
        return top
    # only the keys either sets: which keys were set says whether a term is on (`ewc_on`)
    try:
        return type(top).model_validate(_merged(top.model_dump(by_alias=True, exclude_unset=True),
                                                own.model_dump(by_alias=True, exclude_unset=True)))
    except ValidationError as error:  # valid alone, not with the top-level keys it keeps
        raise TenureError(f"config key '{key}' with the top-level section's other keys: "
                          f"{error.errors()[0]['msg']}") from None


def resolve(cfg) -> tuple[dict[str, Task], list[Stage]]:
    """(tasks by name in training order, stages) of either config form, validated across sections."""
    if cfg.stages is None:
        if cfg.task is None and cfg.data is None:
            raise TenureError("missing config key 'task' (a single task: `task` and `data`; "
                              "a staged run: `tasks` and `stages`)")
        if cfg.task is None or cfg.data is None:
            raise TenureError(f"missing config key '{'data' if cfg.data is None else 'task'}'")
        if KINDS[cfg.task.kind].harness:
            raise TenureError("config key 'task.kind': lm_eval is a probe of a staged run (`tasks:` + `stages:`), "
                              "scored but never trained")
        task = Task(SINGLE_TASK, cfg.task, cfg.data, cfg.eval.metric,
                    cfg.eval.mode or ("min" if cfg.eval.metric in LOWER_IS_BETTER else "max"))
        _check_pack(cfg.task.kind, cfg.data, "")
        stage = Stage(0, SINGLE_TASK, {SINGLE_TASK: 1.0}, cfg.train.steps, cfg.trainable, cfg.optim,
                      cfg.ewc, cfg.l2sp, cfg.replay, None, (), cfg.kl)
        return {SINGLE_TASK: task}, [stage]
    if cfg.task is not None or cfg.data is not None:
        raise TenureError("config key 'stages': describe every task under `tasks`, not `task` / `data`")
    if not cfg.tasks:
        raise TenureError("missing config key 'tasks' (`stages` train the tasks it names)")
    if not cfg.stages:
        raise TenureError("config key 'stages': the list is empty; list at least one stage (`tasks`, `steps`)")
    if cfg.train.steps is not None:  # read by nothing in a staged run: it would silently train stages.N.steps
        raise TenureError("config key 'train.steps': a staged run counts its steps per stage; set stages.N.steps")
    tasks = {}
    for name, entry in cfg.tasks.items():
        metric = entry.metric or KINDS[entry.kind].metric  # lm_eval: chosen from the harness's task (engine/train/build.py)
        tasks[name] = Task(name, entry, entry.data or DataConfig(), metric,
                           entry.mode or ("min" if metric in LOWER_IS_BETTER else "max"))
        _check_pack(entry.kind, tasks[name].data, f"tasks.{name}.")
    stages, seen = [], []
    for i, s in enumerate(cfg.stages):
        weights = dict(s.tasks) if isinstance(s.tasks, dict) else {t: 1.0 for t in s.tasks}
        if len(weights) < len(s.tasks):  # a list naming a task twice does not weigh it twice
            raise TenureError(f"config key 'stages.{i}.tasks': a task is named twice ({', '.join(s.tasks)}); give "
                              "loss weights as a mapping ({A: 1.0, B: 0.5})")
        for name, weight in weights.items():
            if name not in tasks:
                raise TenureError(f"config key 'stages.{i}.tasks': unknown task {name!r} "
                                  f"(tasks: {', '.join(tasks)})")
            if not weight > 0:  # a negative weight ascends the task's loss; a zero one trains nothing
                raise TenureError(f"config key 'stages.{i}.tasks.{name}': loss weight {weight} must be above 0 "
                                  "(leave the task out of the stage not to train it)")
            if tasks[name].kind.harness:
                raise TenureError(f"config key 'stages.{i}.tasks': {name!r} is an lm_eval probe, scored but never "
                                  "trained; train a task with data")
        ewc = _inherit(cfg.ewc, s.ewc, f"stages.{i}.ewc")
        for name in ewc.tasks or ():
            if name not in tasks:
                raise TenureError(f"config key 'stages.{i}.ewc.tasks': unknown task {name!r}")
            if tasks[name].kind.harness:
                raise TenureError(f"config key 'stages.{i}.ewc.tasks': {name!r} is an lm_eval probe, which has no "
                                  "training data for a Fisher")
        if s.guard is not None:
            for name in _names(s.guard.task):
                if name not in seen:
                    raise TenureError(f"config key 'stages.{i}.guard.task': {name!r} is not trained "
                                      "in an earlier stage")
                if not tasks[name].data.validation:
                    raise TenureError(f"config key 'stages.{i}.guard.task': task {name!r} has no validation split "
                                      f"(tasks.{name}.data.validation), which the guard watches")
            if not any(tasks[t].data.validation for t in weights):
                raise TenureError(f"config key 'stages.{i}.guard': the guard keeps the stage's best weights by its "
                                  f"own tasks' validation score, and {', '.join(weights)} has no validation split")
        replay = _inherit(cfg.replay, s.replay, f"stages.{i}.replay")
        for name in replay.tasks or ():
            if name not in tasks or tasks[name].kind.harness or name in weights:
                raise TenureError(f"config key 'stages.{i}.replay.tasks': {name!r} is "
                                  + ("not a task" if name not in tasks else "an lm_eval probe (no training data)"
                                     if tasks[name].kind.harness else "trained by this stage")
                                  + f" (tasks with data: {', '.join(t for t in tasks if not tasks[t].kind.harness)})")
        if i == 0:  # the top-level sections start at the second stage; the first's own ones would keep nothing
            if s.ewc is not None and ewc.lam > 0 and not ewc.tasks:
                raise TenureError("config key 'stages.0.ewc': the first stage has no earlier stage whose Fisher to "
                                  "take; name the tasks to keep (stages.0.ewc.tasks) or move the section to a "
                                  "later stage")
            if s.replay is not None and replay.ratio > 0 and not replay.tasks:
                raise TenureError("config key 'stages.0.replay': the first stage has no earlier stage to replay; "
                                  "name the tasks to mix in (stages.0.replay.tasks) or move the section to a "
                                  "later stage")
        if cfg.method == "joint":
            replay = _joint_replay(replay, weights, seen, i)
        own = lambda name: _inherit(getattr(cfg, name), getattr(s, name), f"stages.{i}.{name}")  # noqa: E731
        stages.append(Stage(i, s.name or "+".join(weights), weights, s.steps, own("trainable"), own("optim"), ewc,
                            own("l2sp"), replay, s.guard, tuple(seen), own("kl")))
        seen += [t for t in weights if t not in seen]
    _check_one_lora(stages)
    order = seen + [t for t in tasks if t not in seen]  # tasks never trained are still evaluated
    tasks = {name: tasks[name] for name in order}
    _check_r_splits(tasks, cfg.eval.mixed_splits)
    return tasks, stages


def _check_one_lora(stages: list[Stage]) -> None:
    """A run's LoRA adapters are made once, with its first stage's rank, alpha and targets, and every
    stage's forward, R's evals and the export apply them: a stage without them, or with others, is refused."""
    first = stages[0].trainable
    if not any(s.trainable.mode == "lora" for s in stages):
        return
    for s in stages[1:]:
        if (first.mode == "lora") != (s.trainable.mode == "lora"):
            raise TenureError(f"config key 'stages.{s.index}.trainable.mode': {s.trainable.mode}, while the first "
                              f"stage's is {first.mode}; a run's LoRA adapters are made with its first stage and "
                              "used by every stage: train every stage with mode lora, or none")
        for field in ("rank", "alpha", "targets"):
            mine, theirs = getattr(s.trainable.lora, field), getattr(first.lora, field)
            if list(mine) != list(theirs) if field == "targets" else mine != theirs:
                raise TenureError(f"config key 'stages.{s.index}.trainable.lora.{field}': {mine} differs from the "
                                  f"first stage's {theirs}; a run has one set of LoRA adapters (rank, alpha, "
                                  "targets; dropout may differ per stage)")


def r_split(task: Task) -> str | None:
    """The split R's column of `task` is scored on: test, else validation (None: neither)."""
    if task.kind.harness:
        return "test"  # the harness's own split of each task (test_split), `limit` documents
    return "test" if task.data.test else ("validation" if task.data.validation else None)


def _check_r_splits(tasks: dict[str, Task], mixed: bool) -> None:
    by_split = {}
    for name, task in tasks.items():
        by_split.setdefault(r_split(task), []).append(name)
    by_split.pop(None, None)
    if len(by_split) > 1 and not mixed:
        raise TenureError("config key 'eval.mixed_splits': R's columns would come from different splits ("
                          + "; ".join(f"{split}: {', '.join(names)}" for split, names in sorted(by_split.items()))
                          + "); give every task a test split, or set eval.mixed_splits: true to accept it")


def _joint_replay(replay: ReplayConfig, weights: dict, earlier: list[str], index: int) -> ReplayConfig:
    """`method: joint`: every stage trains on its own tasks and every earlier task in equal shares
    of the batch, one mean over it (whole training sets): the replay of all earlier tasks at ratio
    E / (E + K) (E earlier tasks, K own). Its last row is the multi-task upper bound."""
    if replay.ratio > 0:
        raise TenureError(f"config key 'stages.{index}.replay': method joint trains every earlier task in every "
                          "stage; a replay section does not apply (remove it or use method: sequential)")
    old = [t for t in earlier if t not in weights]
    return ReplayConfig(ratio=len(old) / (len(old) + len(weights)), loss="mean")


def _check_pack(kind: str, data, where: str) -> None:
    problem = pack_error(kind) if data.pack else None
    if problem:
        raise TenureError(where + problem)


def _names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def score_mode(modes, fallback: str | None) -> str:
    """Whether a larger stage score is better: its tasks' one mode, else `fallback` (eval.mode), else max."""
    modes = set(modes)
    return modes.pop() if len(modes) == 1 else (fallback or "max")


def guarded_tasks(guard: GuardConfig) -> list[str]:
    return _names(guard.task)


def replayed_tasks(stage: Stage) -> list[str]:
    """Tasks this stage replays (none when replay is off): `replay.tasks`, else the earlier tasks in
    training order."""
    if stage.replay.ratio <= 0:
        return []
    return list(stage.replay.tasks) if stage.replay.tasks else [t for t in stage.earlier if t not in stage.weights]
