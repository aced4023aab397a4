"""Optimizer: frozen leaves zeroed (no state), global-norm clip over trainable leaves, one
optimizer per LR group.

Chain: zero frozen grads -> clip by global norm -> optax.partition({"frozen": set_to_zero,
group: base optimizer at lr * multiplier}). Frozen grads are zeroed before the clip so the
norm covers trainable leaves only; `set_to_zero` keeps no moments for them.

Why one optimizer per group rather than one Adam + per-label scale: the state size is the
same (each trainable leaf has its moments once; a group adds only a step counter), the
multiplier scales the LR exactly, warmup included, and AdamW's decoupled weight decay is
scaled with its group's LR, as per-group AdamW in PyTorch does.

Gradient accumulation is explicit micro-batching inside the train step (engine/train/step.py),
not optax.MultiSteps: MultiSteps keeps a full-size gradient buffer for frozen leaves too,
and it would count micro-steps in the optimizer step.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tenure.engine.train.trainability import FROZEN, Trainability, path_str


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adamw", "adafactor", "sgd"] = Field("adamw", description="base optimizer")
    lr: float = Field(2e-5, gt=0, description="peak learning rate (after warmup)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw (b1, b2), each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="adamw epsilon")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd momentum (0 = plain SGD)")
    weight_decay: float = Field(0.01, ge=0, description="decoupled decay; never on biases or norm params")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay after warmup: linear to 0, cosine to 0, or constant")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup from 0 over this many steps")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warmup as a fraction of total steps")
    clip_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm (trainable leaves); None = off")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches summed into one optimizer step")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas):
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each beta must lie in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        if self.momentum > 0 and self.name != "sgd":  # it would be ignored: adamw's first moment is betas[0]
            raise ValueError(f"optim.momentum applies to sgd, not {self.name} (adamw: optim.betas)")
        return self


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_ratio * total_steps))


def build_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """LR at optimizer step `count` (0-based): linear warmup to cfg.lr, then the decay."""
    warmup = min(warmup_steps(cfg, total_steps), total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decays(path: str) -> bool:
    """Weight decay applies to every param except biases and norm scales/biases."""
    parts = path.split("/")
    return parts[-1] != "bias" and not any("norm" in p.lower() for p in parts[:-1])


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_str(path)), params)


def _base(cfg: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.name == "adafactor":
        # multiply_by_parameter_scale=False so `lr` is an absolute step size, as for adamw.
        return optax.adafactor(lr, multiply_by_parameter_scale=False,
                               weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                       optax.sgd(lr, momentum=cfg.momentum or None))


def zero_frozen(labels) -> optax.GradientTransformation:
    """Stateless: frozen leaves' gradients become 0 (so clipping and norms see only trainable ones)."""

    def update(updates, state, params=None):
        del params
        zeroed = jax.tree.map(lambda label, u: jnp.zeros_like(u) if label == FROZEN else u, labels, updates)
        return zeroed, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: OptimConfig, trainability: Trainability, total_steps: int) -> optax.GradientTransformation:
    schedule = build_schedule(cfg, total_steps)
    groups = {FROZEN: optax.set_to_zero()}
    for group, mult in trainability.lr_multipliers.items():
        groups[group] = _base(cfg, lambda count, m=mult: m * schedule(count))
    clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(zero_frozen(trainability.labels), *clip,
                       optax.partition(groups, trainability.labels))
