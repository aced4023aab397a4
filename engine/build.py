"""Builds a run from its config: mesh, tokenizer, labels, model, sharded params, optimizer.

The order matters: the trainability spec is compiled against the abstract param tree
(LoRA leaves included), and its `frozen_prefix` then goes back into the model so the
frozen stages run forward-only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from engine import sharding
from engine.config import Config
from engine.data.pipeline import build_eval_batches, build_label_vocab, build_train_iterator
from models.errors import TenureError
from engine.losses import task_losses
from engine.optim import build_optimizer
from engine.step import TrainState, init_state
from engine.trainability import Trainability, compile_trainability
from models.hf import load_hf, resolve_model_dir
from models.tasks import ENCODER_FAMILIES, build_task_model, graft_pretrained

MODEL_KIND = {"sft": "causal_lm"}  # SFT is causal LM whose prompt tokens carry no labels


@dataclasses.dataclass
class Run:
    cfg: Config
    mesh: jax.sharding.Mesh
    model_dir: str
    arch: Any
    tokenizer: Any
    label_vocab: Any
    model: Any
    trainability: Trainability
    tx: Any
    losses: dict
    state: TrainState
    state_shardings: Any
    total_steps: int
    train_iter: Any
    eval_batches: dict[str, list[dict]]  # split -> process-local numpy batches


def _num_labels(cfg: Config, label_vocab) -> int | None:
    if label_vocab is not None:
        return len(label_vocab)
    return 1 if cfg.task.kind == "regression" else None


def _lora_spec(cfg: Config):
    from models.lora import LoRASpec
    if cfg.trainable.mode != "lora":
        return None
    lora = cfg.trainable.lora
    return LoRASpec(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets), dropout=lora.dropout)


def _pooling(cfg: Config, arch) -> str:
    if cfg.task.pooling:
        return cfg.task.pooling
    if cfg.task.kind == "embedding":
        return "mean"
    return "cls" if type(arch).__name__ in ENCODER_FAMILIES else "last"


DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                  "embd_dropout", "attn_dropout", "resid_dropout", "attention_dropout")


def _with_dropout(arch, rate: float | None):
    """`model.dropout` overrides every dropout rate the architecture config has."""
    if rate is None:
        return arch
    names = {f.name for f in dataclasses.fields(arch)} & set(DROPOUT_FIELDS)
    return dataclasses.replace(arch, **{name: rate for name in names})


def _model(cfg: Config, arch, num_labels, frozen_prefix: int):
    return build_task_model(
        arch, MODEL_KIND.get(cfg.task.kind, cfg.task.kind), num_labels=num_labels or 2,
        pooling=_pooling(cfg, arch), lora=_lora_spec(cfg), dtype=jnp.dtype(cfg.model.dtype),
        remat=cfg.model.remat, frozen_prefix=frozen_prefix,
        normalize_embeddings=cfg.task.normalize)


def total_steps(cfg: Config, num_train_batches: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    if cfg.data.num_epochs:
        return max(1, num_train_batches)
    raise TenureError("config: set train.steps or data.num_epochs")


def build_run(cfg: Config, whole_pretrained_head: bool = False) -> Run:
    """`whole_pretrained_head` keeps the loaded task head too (evaluating an exported model)."""
    mesh = sharding.make_mesh(cfg.mesh)
    model_dir = resolve_model_dir(cfg.model.path)
    arch, pretrained, pretrained_head, tokenizer = load_hf(model_dir)
    arch = _with_dropout(arch, cfg.model.dropout)
    label_vocab = build_label_vocab(cfg.data, cfg.task.kind)  # None for unlabelled kinds
    num_labels = _num_labels(cfg, label_vocab)
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = build_train_iterator(cfg.data, cfg.task.kind, tokenizer, label_vocab,
                                      seed=cfg.train.seed, **where)
    eval_batches = {split: list(build_eval_batches(cfg.data, split, cfg.task.kind, tokenizer,
                                                   label_vocab, **where))
                    for split in ("validation", "test") if getattr(cfg.data, split)}
    sample_batch = next(iter(eval_batches.values()))[0] if eval_batches else train_iter.peek()

    probe = _model(cfg, arch, num_labels, frozen_prefix=0)
    rng = jax.random.key(cfg.train.seed)
    abstract = nn.unbox(jax.eval_shape(lambda: probe.init(rng, sample_batch, deterministic=True)["params"]))
    trainability = compile_trainability(
        abstract, cfg.trainable, num_layers=arch.num_layers)
    model = _model(cfg, arch, num_labels, frozen_prefix=trainability.frozen_prefix)

    params, param_shardings = sharding.init_sharded(
        lambda: model.init(rng, sample_batch, deterministic=True)["params"], mesh)
    if cfg.model.init == "pretrained":
        # Task heads start fresh; LM heads (MLM, untied causal LM) and BERT's pooler keep
        # their pretrained weights.
        keep_head = pretrained_head if whole_pretrained_head or cfg.task.kind in (
            "mlm", "causal_lm", "sft") else (
            {"pooler": pretrained_head["pooler"]} if pretrained_head and "pooler" in pretrained_head
            else None)
        params = jax.device_put(graft_pretrained(params, pretrained, keep_head), param_shardings)

    steps = total_steps(cfg, train_iter.num_batches)
    tx = build_optimizer(cfg.optim, trainability, steps)
    state, state_shardings = init_state(params, tx, cfg.train.seed + 1, mesh, param_shardings)
    return Run(cfg=cfg, mesh=mesh, model_dir=str(model_dir), arch=arch, tokenizer=tokenizer,
               label_vocab=label_vocab, model=model, trainability=trainability, tx=tx,
               losses=task_losses(cfg.task.kind, cfg.task), state=state,
               state_shardings=state_shardings, total_steps=steps,
               train_iter=train_iter, eval_batches=eval_batches)
