"""The regularisers a stage trains with, and what they hold in `TrainState.extra`:

  ewc   {"fisher": F, "anchor": theta*}: F is the diagonal Fisher of the Fisher tasks (default:
        the previous stage's), averaged over `ewc.examples` of their training records, taken at
        the start of the stage (= the end of the previous one, so theta* is those weights); Online
        EWC keeps ONE penalty: F <- gamma * F_previous + F_new, anchored at the latest theta*. A
        stage with EWC off carries the accumulated F through unchanged ({"fisher": F} only, no
        penalty), so a later EWC stage adds to it instead of starting over. A task's Fisher is
        taken with the head it had when it was trained: class-incremental (heads: shared), the
        classes of the tasks trained up to its stage, not those added since (exact mode sums over
        those classes only).
  kl    {"anchor": theta_start}: the trainable leaves' values in the starting model (the stage's
        start, or the pretrained weights), from which the KL-to-start term recomputes the starting
        model's predictions in the train step (tenure.engine.tasks.losses.kl_to_start).
  l2sp  {"anchor": theta0}: the pretrained (or stage-start) weights of the trainable backbone
        (LoRA: the adapters, and the penalty is on the merged weight's change, engine/continual/regularizers.py).

Which are on: `ewc_on` / `kl_on` / `l2sp_on` in engine/config/stages.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.train.build import Backbone, Tasks, batch_shards, config_key, process_where, lora_spec
from tenure.engine.data.pipeline import (EvalBatches, TaskFeaturizer, load_train_records, make_featurizer,
                                         to_global_batch)
from tenure.engine.data.sources import select
from tenure.engine.continual.fisher import FISHER_CHUNK, fisher_diagonal, make_fisher_step, online_update, prune
from tenure.engine.tasks.kinds import KINDS
from tenure.engine.tasks.losses import kl_to_start
from tenure.engine.continual.regularizers import copy_f32, ewc_extra, ewc_term, l2sp_extra, l2sp_term
from tenure.engine.runtime.distributed import print_primary
from tenure.models.errors import TenureError
from tenure.engine.config.stages import Stage, ewc_on, fisher_tasks, kl_on, l2sp_on


def _fisher_batches(backbone: Backbone, tasks: Tasks, name: str, examples: int, seed: int, key: str):
    """Global batches of `examples` training records of task `name`, a seeded random choice; all of
    them, said in a note naming config key `key`, when the task has fewer (a note, not a refusal:
    this runs at a later stage's start, after earlier stages trained)."""
    run_task = tasks.by_name[name]
    data, kind = run_task.task.data, run_task.task.spec.kind
    records = next(iter(load_train_records(data, kind, backbone.tokenizer, tasks.label_vocab).values()))
    if examples > len(records):
        print_primary(f"note: config key '{key}': {examples} is more than the {len(records)} training records of "
                      f"task {name}: its Fisher averages over all {len(records)}")
    chosen = np.sort(np.random.default_rng([seed, run_task.index]).permutation(len(records))[:examples])
    records = select(records, chosen)
    featurizer = make_featurizer(data, kind, backbone.tokenizer, tasks.label_vocab, records)
    if tasks.multi:
        featurizer = TaskFeaturizer(featurizer, run_task.index)
    # Every row of a Fisher batch costs its backward passes, padding rows too: a batch holds the
    # chosen examples (rounded up to one pass per data shard, or to whole passes of FISHER_CHUNK),
    # not eval_batch_size rows.
    shards = batch_shards(backbone.mesh) * jax.process_count()
    per_shard = -(-len(records) // shards)
    if per_shard > FISHER_CHUNK:
        per_shard = -(-per_shard // FISHER_CHUNK) * FISHER_CHUNK
    rows = min(data.global_eval_batch_size, per_shard * shards)
    batches = EvalBatches(records, featurizer, global_batch=rows,
                          buckets=data.length_buckets, pad_id=backbone.tokenizer.pad_token_id or 0,
                          seed=seed, **process_where())
    return (to_global_batch(b, backbone.mesh) for b in batches)


def fisher_head(cfg, tasks: Tasks, stages: list[Stage], index: int, name: str) -> tuple:
    """(label masks, classes) task `name`'s Fisher is taken with at the start of stage `index`:
    the masks of the last earlier stage that trained it (else stage `index`'s), and the classes its
    row allows (None: all; a probe or a kind without classes: no masks)."""
    run_task = tasks.by_name[name]
    trained = [s for s in stages[:index] if name in s.weights]
    masks = tasks.label_masks(trained[-1] if trained else stages[index], cfg.heads)
    if masks is None or run_task.probe or not KINDS[run_task.task.spec.kind].classifies:
        return None, None
    return masks, tuple(i for i, on in enumerate(masks[tasks.by_name[name].index]) if on)


def _fisher_model(model, masks):
    """`model` with the label masks of the Fisher task's own stage (a probe model has none)."""
    if getattr(model, "label_masks", None) is None or model.label_masks == masks:
        return model
    return model.clone(label_masks=masks)


def _backbone_mask(trainable_mask):
    return {k: (v if k == "backbone" else jax.tree.map(lambda _: False, v)) for k, v in trainable_mask.items()}


def regularizers(cfg, stages: list[Stage], index: int, backbone: Backbone, tasks: Tasks, trainability, params,
                 param_shardings, start_params, previous_extra: dict, *, models=None,
                 model=None) -> tuple[dict, dict]:
    """(loss terms, extra) of stage `index`. With `models` (task name -> model, see
    `tenure.engine.train.build.eval_models`) the Fisher pass runs; without, the extra holds zeros of the right
    shapes (the target a checkpoint of this stage restores into). `model` is the stage's train
    model, which the KL-to-start term runs (None: that term's extra only, for a restore target)."""
    stage, losses, extra = stages[index], {}, {}
    mask = trainability.trainable_mask
    if ewc_on(stage):
        previous = (previous_extra.get("ewc") or {}).get("fisher")
        names = fisher_tasks(stages, index)
        fisher = None
        if names and models is not None:
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed + 17), index)
            for name in names:
                spec = tasks.by_name[name].task.spec
                masks, classes = fisher_head(cfg, tasks, stages, index, name)
                step = make_fisher_step(_fisher_model(models[name], masks), spec.kind, stage.ewc.fisher, mask,
                                        backbone.mesh, param_shardings, temperature=spec.temperature,
                                        classes=classes)
                batches = _fisher_batches(backbone, tasks, name, stage.ewc.examples, cfg.train.seed + index,
                                          config_key(cfg, index, "ewc.examples"))
                f, _ = fisher_diagonal(step, params, batches, jax.random.fold_in(key, tasks.by_name[name].index),
                                       max_examples=stage.ewc.examples)
                fisher = f if fisher is None else jax.tree.map(jnp.add, fisher, f)
        elif names:
            fisher = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), prune(params, mask))
        fisher = online_update(previous, fisher, stage.ewc.gamma) if fisher is not None else previous
        if fisher is not None:
            extra["ewc"] = ewc_extra(fisher, params)
            losses["ewc"] = ewc_term(stage.ewc.lam)
    elif (previous_extra.get("ewc") or {}).get("fisher") is not None:
        extra["ewc"] = {"fisher": previous_extra["ewc"]["fisher"]}  # kept for a later EWC stage
    if kl_on(stage):
        kinds = sorted({tasks.by_name[name].task.spec.kind for name in stage.weights})
        unsupported = [kind for kind in kinds if KINDS[kind].kl_unit is None]
        if unsupported:
            with_one = ", ".join(name for name, kind in KINDS.items() if kind.kl_unit)
            raise TenureError(f"stages.{index}.kl: the KL to the starting model needs a predictive distribution; "
                              f"task kind {unsupported[0]} has none (kinds with one: {with_one})")
        source = start_params if stage.kl.anchor == "pretrained" else params
        extra["kl"] = {"anchor": copy_f32(prune(source, mask))}
        if model is not None:
            task_ids = tuple(tasks.by_name[name].index for name in stage.weights) if tasks.multi else None
            # a stage's kinds share one head, so one unit (example, token, causal token)
            losses["kl"] = kl_to_start(model, KINDS[kinds[0]].kl_unit, stage.kl.weight, task_ids)
    if l2sp_on(stage):
        source = start_params if stage.l2sp.anchor == "pretrained" else params
        extra["l2sp"] = l2sp_extra(source, _backbone_mask(mask))
        lora = lora_spec(stage.trainable)
        losses["l2sp"] = l2sp_term(stage.l2sp.alpha, lora.scale if lora is not None else None)
    return losses, extra
