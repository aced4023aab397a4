"""Builds a run in two parts, so the data flows one way:

  build_backbone(cfg)         once per run: mesh, architecture, tokenizer, pretrained weights
  build_tasks(cfg, backbone)  once per run: every task's labels (one vocabulary over all tasks)
                              and its evaluation batches; `eval_models` the model each is scored with
  start_params(...)           the starting params (pretrained backbone, fresh heads), sharded,
                              their frozen base in its dtype (tenure.engine.train.frozen_base)
  build_step(...)             once per stage: trainability, model, optimizer and schedule, loss
                              terms, train state and the jitted train step; from abstract params
                              (jax.ShapeDtypeStruct) an abstract state: the step `tenure compile`
                              and `tenure bench` compile is this one (engine/train/assemble.py)
  build_stage(...)            build_step plus the stage's data mixture (tasks + replay)

The trainability spec is compiled against the abstract param tree (LoRA leaves included), and
its `frozen_prefix` then goes back into the stage's model so the frozen layers run forward-only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.runtime import sharding
from tenure.engine.runtime.distributed import print_primary
from tenure.engine.config.schema import Config
from tenure.engine.data.mixture import ReservoirBuffer
from tenure.engine.data.pipeline import (EvalBatches, TaskFeaturizer, TrainIterator, TrainSource, build_eval_batches,
                                         build_label_vocab, load_train_records, make_featurizer, make_train_iterator,
                                         plan_total_steps)
from tenure.engine.data.records import LabelVocab
from tenure.engine.data.sources import select
from tenure.engine.train.divergence import init_divergence_state
from tenure.engine.train.frozen_base import FrozenBase
from tenure.engine.tasks.kinds import HARNESS_HEAD, KINDS, VOCAB_HEADS
from tenure.engine.tasks.losses import of_task, one_mean
from tenure.engine.train.optim import build_optimizer, build_schedule
from tenure.engine.config.stages import Stage, Task, replayed_tasks
from tenure.engine.train.step import TrainState, init_state, like_params_shardings, make_train_step
from tenure.engine.train.trainability import Trainability, compile_trainability, first_unmatched
from tenure.models.errors import TenureError
from tenure.models.hf import load_hf, resolve_model_dir
from tenure.models.positions import check_max_length
from tenure.models.tasks import ENCODER_FAMILIES, build_task_model, graft_pretrained

DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                  "embd_dropout", "attn_dropout", "resid_dropout", "attention_dropout")


@dataclasses.dataclass
class Backbone:
    mesh: jax.sharding.Mesh
    model_dir: str
    arch: Any
    pretrained: Any
    pretrained_head: Any
    tokenizer: Any


def with_dropout(arch, rate: float | None):
    """`model.dropout` overrides every dropout rate the architecture config has."""
    if rate is None:
        return arch
    names = {f.name for f in dataclasses.fields(arch)} & set(DROPOUT_FIELDS)
    return dataclasses.replace(arch, **{name: rate for name in names})


def build_backbone(cfg: Config, model_path: str | None = None, *, weights: bool | None = None,
                   tokenizer: bool = True, devices=None) -> Backbone:
    """The mesh (over `devices`, default all) and the model directory's architecture, tokenizer
    and, with `weights` (default: model.init=pretrained), its pretrained weights."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    model_dir = resolve_model_dir(model_path or cfg.model.path)
    weights = cfg.model.init == "pretrained" if weights is None else weights
    arch, pretrained, pretrained_head, tokenizer = load_hf(model_dir, with_tokenizer=tokenizer, with_weights=weights)
    return Backbone(mesh, str(model_dir), with_dropout(arch, cfg.model.dropout), pretrained, pretrained_head,
                    tokenizer)


def process_where() -> dict:
    """This process's index and the process count, as the data loaders take them."""
    return dict(process_index=jax.process_index(), process_count=jax.process_count())


def batch_shards(mesh) -> int:
    """The data x fsdp shards of one process's batch rows (packed batches keep row counts divisible by it)."""
    return max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())


@dataclasses.dataclass
class RunTask:
    task: Task
    index: int                       # task_id stamped on its examples (multi-task runs)
    labels: tuple | None             # this task's own labels (a subset of the run's vocabulary)
    eval_batches: dict[str, EvalBatches]
    probe: bool = False              # evaluation only, with its own parameter-free head on the backbone


@dataclasses.dataclass
class Tasks:
    by_name: dict[str, RunTask]
    head: str                        # the model head every trained task shares
    label_vocab: LabelVocab | None   # one vocabulary over the labels of every task
    multi: bool                      # several tasks: examples carry task_id, keys carry task names

    @property
    def first(self) -> RunTask:
        return next(iter(self.by_name.values()))

    def label_masks(self, stage: Stage, heads: str) -> tuple | None:
        """Which labels each task may predict in `stage`: its own (per_task), or those of every task
        trained up to this stage (shared, class-incremental). None when nothing is masked."""
        if not self.multi or self.label_vocab is None:
            return None
        trained = [*stage.earlier, *stage.weights]
        active = {label for name in trained for label in self.by_name[name].labels}
        rows = []
        for run_task in self.by_name.values():
            own = set(run_task.labels or ()) if heads == "per_task" else active  # unlabelled: no classifier
            rows.append(tuple(label in own for label in self.label_vocab.labels))
        return tuple(rows)


def build_tasks(cfg: Config, backbone: Backbone, tasks: dict[str, Task], trained: list[str]) -> Tasks:
    heads = {KINDS[tasks[name].spec.kind].head for name in trained}
    if len(heads) > 1:
        raise TenureError(f"tasks: every trained task of a run must share one model head, got {sorted(heads)} "
                          f"(kinds {[tasks[name].spec.kind for name in trained]})")
    head = heads.pop()
    lm_eval = [name for name, task in tasks.items() if KINDS[task.spec.kind].harness]
    if lm_eval and (head != HARNESS_HEAD or type(backbone.arch).__name__ in ENCODER_FAMILIES):
        raise TenureError(f"tasks.{lm_eval[0]}: an lm_eval probe scores the run's causal LM; this run trains a "
                          f"{head} head on {type(backbone.arch).__name__} (lm_eval needs causal_lm / sft on a decoder)")
    tasks = {name: lm_eval_metric(task) if name in lm_eval else task for name, task in tasks.items()}
    probes = {name for name, task in tasks.items() if KINDS[task.spec.kind].head != head}
    # an evaluation-only task with a head of its own must be of a kind whose head has no trained
    # weights, so scoring it on the run's backbone measures the backbone (e.g. what fine-tuning did
    # to the pretrained sentence embeddings)
    for name in sorted(probes):
        if not KINDS[tasks[name].spec.kind].probe_head:
            probe_kinds = ", ".join(kind.name for kind in KINDS.values() if kind.probe_head)
            raise TenureError(f"tasks.{name}: an evaluation-only task with a head other than the trained "
                              f"{head!r} must be of a kind whose head has no trained weights "
                              f"({probe_kinds}); a {tasks[name].spec.kind} head would be scored untrained")
    multi = len(tasks) > 1
    for name, task in tasks.items():  # before any data is read: choices that cannot work
        if name in lm_eval:
            continue
        where = f"tasks.{name}: " if multi else ""
        kind = KINDS[task.spec.kind]
        generation = (kind.generation and task.spec.generation_examples > 0
                      and (task.data.format or "prompt_completion") == "prompt_completion")
        problem = kind.check_metric(task.metric, task.mode, generation=generation)
        if problem:
            raise TenureError(where + problem)
        warning = check_max_length(backbone.arch, task.data.max_length)
        if warning and jax.process_index() == 0:
            print(f"warning: {where}{warning}", flush=True)
    own_labels = {}
    for name, task in tasks.items():
        vocab = build_label_vocab(task.data, task.spec.kind)  # None for unlabelled kinds
        own_labels[name] = vocab.labels if vocab is not None else None
    if cfg.heads == "shared":
        _refuse_shared_labels(own_labels)
    union = None
    if any(labels is not None for labels in own_labels.values()):
        union = LabelVocab(label for labels in own_labels.values() for label in labels or ())
    by_name = {}
    for index, (name, task) in enumerate(tasks.items()):
        if name in lm_eval:  # the harness reads its own documents: no batches (R from test, curves validation)
            by_name[name] = RunTask(task, index, None, {"validation": [], "test": []})
            continue
        eval_batches = {split: build_eval_batches(task.data, split, task.spec.kind, backbone.tokenizer, union,
                                                  task_id=index if multi else None,
                                                  batch_shards=batch_shards(backbone.mesh), **process_where())
                        for split in ("validation", "test") if getattr(task.data, split)}
        by_name[name] = RunTask(task, index, own_labels[name], eval_batches, probe=name in probes)
    return Tasks(by_name, head, union, multi)


def lm_eval_metric(task: Task) -> Task:
    """`task` with the metric R records (`lm-eval task/metric`; default the first task's first metric)
    and its direction (the harness's higher_is_better)."""
    from tenure.engine.tasks.lm_eval_adapter import offline_error, task_manager_for
    names = task.spec.tasks
    try:
        loaded = task_manager_for(names).load(names)["tasks"]
    except KeyError as error:
        raise TenureError(f"tasks.{task.name}.tasks: {error.args[0]}") from None
    except ConnectionError as error:
        raise offline_error(error) from None
    higher = {}
    for name in names:
        if name not in loaded:
            raise TenureError(f"tasks.{task.name}.tasks: {name!r} is not an lm-eval task (a group: list its tasks)")
        higher |= {f"{name}/{metric}": better for metric, better in loaded[name].higher_is_better().items()}
    metric = task.spec.metric or next(iter(higher))
    if metric not in higher:
        raise TenureError(f"tasks.{task.name}.metric: {metric!r} is none of the harness's metrics "
                          f"({', '.join(higher)})")
    return dataclasses.replace(task, metric=metric, mode=task.spec.mode or ("max" if higher[metric] else "min"))


def _refuse_shared_labels(own_labels: dict[str, tuple | None]) -> None:
    """Class-incremental (`heads: shared`) tasks must have disjoint label sets: a shared class
    would be scored for both tasks, and a task would score before it is trained."""
    names = [name for name, labels in own_labels.items() if labels]
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = [label for label in own_labels[first] if label in set(own_labels[second])]
            if shared:
                raise TenureError(f"heads: shared: tasks {first} and {second} share the label"
                                  f"{'s' * (len(shared) > 1)} {', '.join(map(repr, shared))}; class-incremental tasks "
                                  "need disjoint labels (data.labels), or use heads: per_task")


def lora_spec(trainable):
    from tenure.models.lora import LoRASpec
    if trainable.mode != "lora":
        return None
    lora = trainable.lora
    return LoRASpec(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets), dropout=lora.dropout)


def _pooling(spec, arch) -> str:
    """The task's pooling, else its kind's, else the backbone's ([CLS] for encoders, the last token)."""
    return (spec.pooling or KINDS[spec.kind].pooling
            or ("cls" if type(arch).__name__ in ENCODER_FAMILIES else "last"))


def model_for(cfg: Config, arch, spec, num_labels: int | None, lora, *, frozen_prefix: int = 0,
              label_masks: tuple | None = None):
    """The task model of task config `spec` (kind, pooling, ...) on architecture `arch`."""
    kind = KINDS[spec.kind]
    return build_task_model(
        arch, kind.head, num_labels=num_labels or kind.default_labels, pooling=_pooling(spec, arch), lora=lora,
        dtype=jnp.dtype(cfg.model.dtype), remat=cfg.model.remat, frozen_prefix=frozen_prefix,
        normalize_embeddings=spec.normalize, label_masks=label_masks, attention=cfg.model.attention,
        scan_layers=cfg.model.scan_layers)


def task_model(cfg: Config, backbone: Backbone, tasks: Tasks, lora, *, frozen_prefix: int = 0,
               label_masks: tuple | None = None):
    num_labels = len(tasks.label_vocab) if tasks.label_vocab is not None else None
    return model_for(cfg, backbone.arch, tasks.first.task.spec, num_labels, lora, frozen_prefix=frozen_prefix,
                     label_masks=label_masks)


def eval_models(cfg: Config, backbone: Backbone, tasks: Tasks, model, lora) -> dict[str, Any]:
    """Task name -> the model it is scored with (and its Fisher taken with): the stage's `model`, or
    for a probe task its own head over the same params (that head has none of its own)."""
    return {name: model_for(cfg, backbone.arch, run_task.task.spec, None, lora) if run_task.probe else model
            for name, run_task in tasks.by_name.items()}


def kept_head(head: str, pretrained_head, keep_all: bool = False):
    """The pretrained head leaves a fresh task model with model head `head` keeps: LM heads (MLM,
    untied causal LM) and BERT's pooler; all of them with `keep_all` (an exported model's own task head)."""
    if keep_all or head in VOCAB_HEADS:
        return pretrained_head
    return {"pooler": pretrained_head["pooler"]} if pretrained_head and "pooler" in pretrained_head else None


def sample_batch(backbone: Backbone, tasks: Tasks, seed: int) -> dict:
    """A batch with the run's fields, to initialise and trace models."""
    first = tasks.first
    if first.eval_batches:
        return next(iter(next(iter(first.eval_batches.values()))))
    train = single_task_iterator(backbone, first, seed=seed, multi=tasks.multi, label_vocab=tasks.label_vocab)
    batch = train.peek()
    train.close()
    return batch


def is_abstract(tree) -> bool:
    return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _kept(cfg: Config, backbone: Backbone, tasks: Tasks, params, keep_pretrained_head: bool, abstract: bool):
    """The pretrained head leaves the task model keeps; for abstract params the model's own head
    stands in for the pretrained head (no weights are read: only its structure counts)."""
    if not abstract:
        return kept_head(tasks.head, backbone.pretrained_head, keep_pretrained_head)
    return kept_head(tasks.head, params.get("head"), keep_pretrained_head) if cfg.model.init == "pretrained" else None


def init_params(cfg: Config, backbone: Backbone, tasks: Tasks, lora, *, batch: dict | None = None,
                keep_pretrained_head: bool = False, abstract: bool = False):
    """(params, param_shardings): the pretrained backbone and fresh task heads (see `kept_head`),
    sharded; `batch` (default: one of the run's) traces the model; `keep_pretrained_head` keeps
    the task head too (evaluating an exported model). `abstract`: sharded jax.ShapeDtypeStructs,
    no weights read or made."""
    model = task_model(cfg, backbone, tasks, lora)
    batch = sample_batch(backbone, tasks, cfg.train.seed) if batch is None else batch
    rng = jax.random.key(cfg.train.seed)

    def init(b):
        return model.init(rng, b, deterministic=True)["params"]

    if abstract:
        boxed = jax.eval_shape(init, batch)
        param_shardings = sharding.param_shardings(boxed, backbone.mesh)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                              param_shardings)
        return params, param_shardings
    if cfg.model.init != "pretrained":
        return sharding.init_sharded(lambda: init(batch), backbone.mesh)
    keep = _kept(cfg, backbone, tasks, None, keep_pretrained_head, abstract)
    return sharding.init_sharded(lambda: init(batch), backbone.mesh,
                                 given=lambda shapes: graft_pretrained(shapes, backbone.pretrained, keep))


def config_key(cfg: Config, index: int, dotted: str) -> str:
    """The config key stage `index`'s setting `dotted` (e.g. "ewc.examples") comes from: the stage's
    own section where that sets it, else the top level (a stage section inherits what it leaves out)."""
    node = cfg.stages[index] if cfg.stages is not None else None
    for name in dotted.split("."):
        if node is None or name not in node.model_fields_set:
            return dotted
        node = getattr(node, name)
    return f"stages.{index}.{dotted}"


def start_params(cfg: Config, stages: list[Stage], backbone: Backbone, tasks: Tasks, *, batch: dict | None = None,
                 keep_pretrained_head: bool = False, abstract: bool = False) -> tuple[Any, Any, FrozenBase]:
    """(params, param_shardings, frozen_base): `init_params` with the base frozen in every stage
    held in its dtype (tenure.engine.train.frozen_base): the params every stage of the run starts from.
    Refuses a stage whose trainable section names what these params lack (`first_unmatched`)."""
    params, param_shardings = init_params(cfg, backbone, tasks, lora_spec(stages[0].trainable), batch=batch,
                                          keep_pretrained_head=keep_pretrained_head, abstract=abstract)
    for stage in stages:
        unmatched = first_unmatched(params, stage.trainable)
        if unmatched:
            field, problem = unmatched
            raise TenureError(f"config key '{config_key(cfg, stage.index, 'trainable.' + field)}': {problem}")
    frozen_base = FrozenBase(cfg, stages, backbone, params,
                             _kept(cfg, backbone, tasks, params, keep_pretrained_head, abstract))
    return frozen_base.cast(params), param_shardings, frozen_base


def single_task_iterator(backbone: Backbone, run_task: RunTask, *, seed: int, multi: bool,
                         label_vocab, accum_steps: int = 1) -> TrainIterator:
    from tenure.engine.data.pipeline import build_train_iterator
    return build_train_iterator(run_task.task.data, run_task.task.spec.kind, backbone.tokenizer, label_vocab,
                                seed=seed, task_id=run_task.index if multi else None,
                                batch_shards=batch_shards(backbone.mesh), accum_steps=accum_steps, **process_where())


def _replay_records(records, buffer: int | None, seed: int, key: str, owner: str):
    """The old task's records a stage replays: all, or a seeded reservoir sample of `buffer`; all,
    said in a note naming config key `key`, when `owner` (the task or its source) has fewer."""
    if buffer is not None and buffer > len(records):
        print_primary(f"note: config key '{key}': {buffer} is more than the {len(records)} training records of "
                      f"{owner}: all {len(records)} are replayed")
    if buffer is None or buffer >= len(records):
        return records, None
    reservoir = ReservoirBuffer(buffer, seed=seed)
    reservoir.extend(range(len(records)))
    indices = np.sort(np.asarray(list(reservoir.items), np.int64))
    return select(records, indices), indices.tolist()


def stage_iterator(backbone: Backbone, tasks: Tasks, stage: Stage, seed: int,
                   buffer_key: str) -> tuple[TrainIterator, dict]:
    """The stage's training batches: its tasks in equal shares, plus `replay.ratio` of every batch
    from earlier tasks (equal shares among them). Returns the iterator and the replay buffers'
    record indices (per old task, or per source of an old task of several; None = whole set).
    `buffer_key`: the config key of `replay.buffer`."""
    accum = stage.optim.grad_accum_steps
    if not tasks.multi:
        return single_task_iterator(backbone, tasks.first, seed=seed, multi=False,
                                    label_vocab=tasks.label_vocab, accum_steps=accum), {}
    replayed = replayed_tasks(stage)
    new_share = (1 - stage.replay.ratio) / len(stage.weights) if replayed else 1.0
    old_share = stage.replay.ratio / len(replayed) if replayed else 0.0
    sources, buffers = [], {}
    for name in [*stage.weights, *replayed]:
        run_task = tasks.by_name[name]
        data, kind = run_task.task.data, run_task.task.spec.kind
        by_source = load_train_records(data, kind, backbone.tokenizer, tasks.label_vocab)
        weights = {source_name: data.sources[source_name].weight for source_name in by_source}
        for source_name, records in by_source.items():
            if name in replayed:
                owner = f"task {name}" + (f"'s source {source_name}" if len(by_source) > 1 else "")
                # a task of several sources: each source's buffer (one key per task kept only the last's)
                kept = name if len(by_source) == 1 else f"{name}/{source_name}"
                records, buffers[kept] = _replay_records(records, stage.replay.buffer, seed + run_task.index,
                                                         buffer_key, owner)
            featurizer = TaskFeaturizer(make_featurizer(data, kind, backbone.tokenizer, tasks.label_vocab, records),
                                        run_task.index)
            # the task's share, split among its sources by their weights
            share = (new_share if name in stage.weights else old_share) * weights[source_name] / sum(weights.values())
            sources.append(TrainSource(f"{name}/{source_name}", records, featurizer, share))
    # Batching (batch size, length buckets, epochs) follows the stage's first task, with room for
    # the longest max_length among the tasks it mixes (their examples share its batches).
    batching = tasks.by_name[next(iter(stage.weights))].task.data
    longest = max(tasks.by_name[name].task.data.max_length for name in [*stage.weights, *replayed])
    if longest > batching.max_length:
        batching = batching.model_copy(update={"max_length": longest,
                                               "length_buckets": [*batching.length_buckets, longest]})
    return make_train_iterator(batching, sources, pad_id=backbone.tokenizer.pad_token_id or 0, seed=seed,
                               batch_shards=batch_shards(backbone.mesh), accum_steps=accum, **process_where()), buffers


def stage_losses(tasks: Tasks, stage: Stage) -> dict:
    """Loss terms: the task's (single-task run), or one per trained task ("task/<name>", weighted);
    a stage that replays: `replay.loss` mean (default), one term "task", the mean over every
    example (token kinds: labelled token) of the batch, new and replayed alike
    (`tenure.engine.tasks.losses.one_mean`), so the replayed share of the loss is the replay ratio; separate,
    those terms plus one per replayed task ("replay/<name>", replay.weight / the number of
    replayed tasks)."""
    if not tasks.multi:
        run_task = tasks.first
        return {"task": KINDS[run_task.task.spec.kind].loss(run_task.task.spec)}
    replayed = replayed_tasks(stage)
    if replayed and stage.replay.loss == "mean":
        parts = {name: (KINDS[tasks.by_name[name].task.spec.kind].loss(tasks.by_name[name].task.spec),
                        tasks.by_name[name].index, stage.weights.get(name, 1.0))
                 for name in [*stage.weights, *replayed]}
        return {"task": one_mean(parts, tuple(replayed))}
    losses = {}
    for name, weight in stage.weights.items():
        spec = tasks.by_name[name].task.spec
        losses[f"task/{name}"] = of_task(KINDS[spec.kind].loss(spec), tasks.by_name[name].index, weight)
    for name in replayed:
        # One replay term over all earlier tasks (their mean), however many there are: a term of
        # weight replay.weight each would give the old tasks k times the new task's pull.
        spec = tasks.by_name[name].task.spec
        losses[f"replay/{name}"] = of_task(KINDS[spec.kind].loss(spec), tasks.by_name[name].index,
                                           stage.replay.weight / len(replayed))
    return losses


def stage_steps(stage: Stage, tasks: Tasks, train_iter: TrainIterator) -> int:
    data = tasks.by_name[next(iter(stage.weights))].task.data
    return plan_total_steps(stage.steps, data.num_epochs, train_iter.num_batches)


@dataclasses.dataclass
class StageStep:
    stage: Stage
    steps: int                       # the schedule's length
    model: Any
    trainability: Trainability
    tx: Any
    losses: dict
    state: TrainState                # abstract (ShapeDtypeStructs) when built from abstract params
    state_shardings: Any
    step_fn: Any


@dataclasses.dataclass
class StageRun(StageStep):
    train_iter: TrainIterator
    replay_buffers: dict


def abstract_state(params, tx, mesh, param_shardings, extra: dict) -> tuple[TrainState, TrainState]:
    """`init_state`'s (state, state_shardings) as sharded jax.ShapeDtypeStructs (nothing allocated)."""
    opt_state = jax.eval_shape(tx.init, params)
    repl = sharding.replicated(mesh)
    shardings = TrainState(step=repl, params=param_shardings,
                           opt_state=like_params_shardings(opt_state, params, param_shardings, mesh), rng=repl,
                           extra=like_params_shardings(extra, params, param_shardings, mesh) if extra else {})
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32), extra=extra)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return state, shardings


def build_step(cfg: Config, stage: Stage, backbone: Backbone, tasks: Tasks, params, param_shardings, *, steps: int,
               regularize=None, xla_options: dict | None = None) -> StageStep:
    """The stage's trainability, model, optimizer over `steps` steps, losses, train state from
    `params` and jitted train step: the one assembly of the step `tenure train`, `tenure compile`
    and `tenure bench` run. `regularize(trainability, model) -> (loss terms, extra)` adds the
    regularisers and the pytrees they read (anchors, Fisher), which live in the train state and
    its checkpoints. Abstract `params` (jax.ShapeDtypeStructs) give an abstract state."""
    lora = lora_spec(stage.trainable)
    trainability = compile_trainability(params, stage.trainable, num_layers=backbone.arch.num_layers)
    model = task_model(cfg, backbone, tasks, lora, frozen_prefix=trainability.frozen_prefix,
                       label_masks=tasks.label_masks(stage, cfg.heads))
    tx = build_optimizer(stage.optim, trainability, steps)
    extra_losses, extra = regularize(trainability, model) if regularize else ({}, {})
    extra = dict(extra, divergence=init_divergence_state()._asdict())
    if is_abstract(params):
        state, state_shardings = abstract_state(params, tx, backbone.mesh, param_shardings, extra)
    else:
        state, state_shardings = init_state(params, tx, cfg.train.seed + 1 + 7919 * stage.index, backbone.mesh,
                                            param_shardings, extra)
    losses = {**stage_losses(tasks, stage), **extra_losses}
    step_fn = make_train_step(model, losses, tx, backbone.mesh, state_shardings,
                              lr_schedule=build_schedule(stage.optim, steps),
                              trainable_mask=trainability.trainable_mask,
                              accum_steps=stage.optim.grad_accum_steps, xla_options=xla_options,
                              divergence=cfg.divergence)
    return StageStep(stage, steps, model, trainability, tx, losses, state, state_shardings, step_fn)


def build_stage(cfg: Config, stage: Stage, backbone: Backbone, tasks: Tasks, params, param_shardings, *,
                regularize=None) -> StageRun:
    """`build_step` over the stage's data: its batches (`stage_iterator`) set the schedule's length."""
    train_iter, buffers = stage_iterator(backbone, tasks, stage, cfg.train.seed + 101 * stage.index,
                                         config_key(cfg, stage.index, "replay.buffer"))
    step = build_step(cfg, stage, backbone, tasks, params, param_shardings,
                      steps=stage_steps(stage, tasks, train_iter), regularize=regularize)
    return StageRun(**{f.name: getattr(step, f.name) for f in dataclasses.fields(step)}, train_iter=train_iter,
                    replay_buffers=buffers)
