"""The first stage's train step for `tenure compile` and `tenure bench`, assembled by the same
functions as `tenure train`'s (tenure.engine.train.build: `start_params`, then `build_step`), without the
run's data, and for compile without its weights:

  shape_tasks(tasks, stages, num_labels)     the run's tasks without their data: no evaluation
                                             batches; a labelled task's labels are its
                                             `data.labels`, else `num_labels` of them (the one
                                             thing a run reads from its data to shape the step:
                                             compile's --num-labels, bench.num_labels)
  abstract_batch(kind, rows, length, mesh)   a training batch as sharded jax.ShapeDtypeStructs
                                             (its fields: tenure.engine.data.batch_spec)
  abstract_step(cfg, devices, num_labels)    the step, its state and batch as ShapeDtypeStructs:
                                             nothing read but config.json, nothing allocated
  bench_step(cfg, model_dir, batch, ...)     the step on real params (pretrained when the
                                             config says so) for `batch`'s fields and shapes
"""
from __future__ import annotations

import dataclasses

import jax

from tenure.engine.runtime import sharding
from tenure.engine.train.build import (Backbone, RunTask, StageStep, Tasks, build_backbone, build_step, is_abstract,
                                       start_params)
from tenure.engine.config.schema import Config
from tenure.engine.data.batch_spec import batch_fields, field_shapes
from tenure.engine.data.records import LabelVocab
from tenure.engine.config.plan import plan
from tenure.engine.config.stages import Stage, Task
from tenure.models.errors import TenureError
from tenure.engine.tasks.kinds import KINDS


def shape_tasks(tasks: dict[str, Task], stages: list[Stage], num_labels: int) -> Tasks:
    """`Tasks` as `build_tasks` makes them, without reading data: a labelled task has its
    `data.labels` when the config lists them, else `num_labels` labels (shared by such tasks)."""
    trained = list(dict.fromkeys(t for s in stages for t in s.weights))
    head = KINDS[tasks[trained[0]].spec.kind].head
    unnamed = tuple(str(i) for i in range(num_labels))
    by_name = {}
    for index, (name, task) in enumerate(tasks.items()):
        labels = LabelVocab(task.data.labels or unnamed).labels if KINDS[task.spec.kind].labelled else None
        by_name[name] = RunTask(task, index, labels, {}, probe=KINDS[task.spec.kind].head != head)
    vocab = LabelVocab(label for run_task in by_name.values() for label in run_task.labels or ())
    return Tasks(by_name, head, vocab if vocab.labels else None, multi=len(tasks) > 1)


def abstract_batch(kind: str, rows: int, length: int, mesh, *, fmt: str | None = None, packed: bool = False,
                   multi: bool = False) -> dict:
    """A training batch of `rows` examples of `length` tokens as jax.ShapeDtypeStructs sharded over
    (data, fsdp) like real ones (fields: tenure.engine.data.batch_spec). A kind packed per batch gets
    one token row per example: the most rows a packed batch can have, so memory is planned for
    the largest packed shape."""
    fields = batch_fields(kind, fmt, packed=packed, multi=multi)
    if any("passages" in f.axes for f in fields.values()):
        raise TenureError(f"task kind {kind!r} is not supported here yet (its batch shape depends on the "
                          "hard negatives in the data)")
    shard = sharding.batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
            for name, (shape, dtype) in field_shapes(fields, examples=rows, length=length).items()}


def train_batch(tasks: Tasks, stage: Stage, mesh) -> dict:
    """The stage's training batch, `abstract_batch` of its first task (whose data sets the batching)."""
    task = tasks.by_name[next(iter(stage.weights))].task
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if task.data.batch_size % shards:
        raise TenureError(f"config key 'data.batch_size': {task.data.batch_size} is not divisible by data x fsdp "
                          f"= {shards} (mesh {dict(mesh.shape)})")
    return abstract_batch(task.spec.kind, task.data.batch_size, task.data.max_length, mesh, fmt=task.data.format,
                          packed=bool(task.data.pack), multi=tasks.multi)


def _stage0_regularizers(cfg: Config, stages, backbone: Backbone, tasks: Tasks, params, param_shardings):
    """The first stage's regularisers as a run starts them (tenure.engine.continual.stage_regularizers), without the Fisher
    pass (its extra holds zeros of the right shapes); on abstract params, their shapes."""
    from tenure.engine.continual.stage_regularizers import regularizers

    def regularize(trainability, model):
        def terms(p):
            return regularizers(cfg, stages, 0, backbone, tasks, trainability, p, param_shardings, p, {})
        if not is_abstract(params):
            return terms(params)
        losses = {}

        def extra_of(p):
            terms_p, extra = terms(p)
            losses.update(terms_p)
            return extra
        extra = jax.eval_shape(extra_of, params)
        return losses, extra
    return regularize


def _step(cfg: Config, backbone: Backbone, tasks: Tasks, stages, batch: dict, *, steps: int, abstract: bool,
          xla_options: dict | None = None) -> StageStep:
    params, param_shardings, _ = start_params(cfg, stages, backbone, tasks, batch=batch, abstract=abstract)
    return build_step(cfg, stages[0], backbone, tasks, params, param_shardings, steps=steps,
                      regularize=_stage0_regularizers(cfg, stages, backbone, tasks, params, param_shardings),
                      xla_options=xla_options)


@dataclasses.dataclass
class AbstractStep:
    step: StageStep
    batch: dict
    mesh: jax.sharding.Mesh
    tasks: Tasks


def abstract_step(cfg: Config, devices, *, num_labels: int = 2) -> AbstractStep:
    """The first stage's step over `devices` (those of a compile target), with abstract params,
    state and batch. Its schedule runs the stage's steps (1000 for a config that trains epochs:
    the length only sets constants of the lr schedule)."""
    run_plan = plan(cfg)
    tasks_by_name, stages = run_plan.tasks, run_plan.stages
    backbone = build_backbone(cfg, weights=False, tokenizer=False, devices=devices)
    tasks = shape_tasks(tasks_by_name, stages, num_labels)
    batch = train_batch(tasks, stages[0], backbone.mesh)
    host_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = _step(cfg, backbone, tasks, stages, host_batch, steps=stages[0].steps or 1000, abstract=True)
    return AbstractStep(step, batch, backbone.mesh, tasks)


def bench_step(cfg: Config, model_dir, batch: dict, *, num_labels: int, steps: int,
               xla_options: dict | None) -> tuple[StageStep, Backbone]:
    """The single-task config's step on real params (pretrained weights for model.init=pretrained,
    no tokenizer read), traced on `batch` (numpy), with `xla_options` (the dot path timed)."""
    run_plan = plan(cfg)
    tasks_by_name, stages = run_plan.tasks, run_plan.stages
    backbone = build_backbone(cfg, str(model_dir), tokenizer=False)
    tasks = shape_tasks(tasks_by_name, stages, num_labels)
    return _step(cfg, backbone, tasks, stages, batch, steps=steps, abstract=False, xla_options=xla_options), backbone
