"""Divergence guard: is this step's update safe to keep? Decided on device, inside the jit.

`guard_step(cfg, state, loss, grad_norm) -> (ok, new_state)` is pure jnp, with no host sync:
the train step calls it on the step's loss and (pre-clipping) gradient norm, returns the
`DivergenceState` in its metrics and, under `skip`, keeps the update only where `ok`
(`keep_if_ok`). The loop reads the state with the metrics it already fetches one step late,
and halts when `state.halt` is set, naming the step and the reason (`describe`), before the
state after the bad step is saved or evaluated.

A step is bad when the loss or gradient norm is NaN/Inf; when the loss exceeds
`spike_factor` times its running mean (floored at `loss_floor`); once `warmup_steps` good
steps have passed, when the gradient norm exceeds `grad_spike_factor` times its own; or when
the update about to be applied is larger than `max_update_ratio` times the weights (a
diverging run often keeps a finite loss while its weights blow up to 1e6, 1e10; with a huge
learning rate this last check refuses the very first blown-up update).
Only good steps update the running means, so a spike cannot raise its own threshold.

Policies: `halt` (default) halts at the first bad step; `skip` skips the update, counts it,
and halts after `max_skips` bad steps in a row.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import BaseModel, ConfigDict, Field

# Reason codes carried in DivergenceState.reason (int32 on device); 0 = the last step was good.
REASONS = {0: "ok", 1: "non-finite loss", 2: "non-finite gradient norm", 3: "loss spike",
           4: "gradient-norm spike", 5: "update larger than the weights"}


class DivergenceConfig(BaseModel):
    """The `divergence` config section (not the forgetting guard of engine/config/stages.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["halt", "skip"] = Field(
        "halt", description="on a bad step (NaN/Inf or spike): halt, or skip the update and go on")
    max_skips: int = Field(3, ge=1, strict=True,
                           description="skip policy: halt after this many bad steps in a row")
    spike_factor: float | None = Field(
        10.0, gt=1, allow_inf_nan=False,
        description="a loss above this many times its running mean (at least loss_floor) is a "
                    "spike; null = no loss-spike check")
    loss_floor: float = Field(
        0.1, ge=0, allow_inf_nan=False,
        description="the running loss mean counts as at least this much, so batch noise near a "
                    "zero loss is not a spike")
    grad_spike_factor: float | None = Field(
        100.0, gt=1, allow_inf_nan=False,
        description="a gradient norm above this many times its running mean is a spike; null = off")
    ema_decay: float = Field(0.9, ge=0, lt=1, allow_inf_nan=False,
                             description="decay of the running means of loss and gradient norm")
    warmup_steps: int = Field(10, ge=0, strict=True,
                              description="good steps before gradient-norm spikes are checked (loss "
                                          "spikes are checked from the second step)")
    max_update_ratio: float | None = Field(
        1.0, gt=0, allow_inf_nan=False,
        description="an update whose global norm exceeds this times the weights' norm is refused "
                    "before it is applied; null = off")


class DivergenceState(NamedTuple):
    """Carried in the train state; every field a scalar jax array."""

    loss_ema: jax.Array       # running mean of the loss over good steps
    grad_norm_ema: jax.Array  # running mean of the gradient norm over good steps
    good_steps: jax.Array     # good steps seen so far (the means are valid once >= 1)
    bad_in_a_row: jax.Array   # consecutive bad steps ending at the last step
    skipped: jax.Array        # bad steps whose update was skipped, in total
    reason: jax.Array         # REASONS code of the last step
    halt: jax.Array           # True: the loop must stop (and must not save this state)


def init_divergence_state() -> DivergenceState:
    f32, i32 = jnp.float32, jnp.int32
    return DivergenceState(loss_ema=jnp.zeros((), f32), grad_norm_ema=jnp.zeros((), f32),
                      good_steps=jnp.zeros((), i32), bad_in_a_row=jnp.zeros((), i32),
                      skipped=jnp.zeros((), i32), reason=jnp.zeros((), i32),
                      halt=jnp.zeros((), jnp.bool_))


def update_ratio(updates, params) -> jax.Array:
    """Global norm of the update over the global norm of the weights it applies to (pass the
    trainable leaves only; frozen leaves have zero updates and would only dilute it)."""
    return optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(params), jnp.finfo(jnp.float32).tiny)


def ratio_before_apply(updates, params, trainable: list[bool]):
    """(updates, ratio): `update_ratio` of the trainable leaves, with the update returned behind an
    optimization barrier that also holds the ratio.

    The step writes the new weights over the old ones (donated buffers). A norm of the old weights,
    or of an update XLA recomputes from them, that nothing orders before that write makes XLA copy
    every weight first (105 copies in a MiniLM step). The barrier orders both norms before any
    weight is written; the update is then materialised once and read by the norm and by the add.
    Same values as `update_ratio`; quickstart-shape step 1.05x faster (docs/performance.md)."""
    def pick(tree):
        return [leaf for leaf, t in zip(jax.tree.leaves(tree), trainable) if t]

    ratio = update_ratio(pick(updates), pick(params))
    return jax.lax.optimization_barrier((updates, ratio))


def guard_step(cfg: DivergenceConfig, state: DivergenceState, loss: jax.Array, grad_norm: jax.Array,
               ratio: jax.Array | None = None) -> tuple[jax.Array, DivergenceState]:
    """(ok, new_state) for one step; `cfg` is static (a Python object closed over by the jit).

    `loss` and `grad_norm` are this step's (at the weights before the update); `ratio` is
    `update_ratio(updates, params)` of the update about to be applied. The loss shows a bad
    update only one step later, so without `ratio` one blown-up update gets through."""
    loss = jnp.asarray(loss, jnp.float32)
    grad_norm = jnp.asarray(grad_norm, jnp.float32)
    reason = jnp.where(~jnp.isfinite(loss), 1, jnp.where(~jnp.isfinite(grad_norm), 2, 0))
    if cfg.spike_factor is not None:
        mean = jnp.maximum(jnp.abs(state.loss_ema), cfg.loss_floor)
        loss_spike = (state.good_steps >= 1) & (jnp.abs(loss) > cfg.spike_factor * mean)
        reason = jnp.where(reason != 0, reason, jnp.where(loss_spike, 3, 0))
    if cfg.grad_spike_factor is not None:
        armed = state.good_steps >= max(cfg.warmup_steps, 1)
        grad_spike = armed & (grad_norm > cfg.grad_spike_factor * state.grad_norm_ema)
        reason = jnp.where(reason != 0, reason, jnp.where(grad_spike, 4, 0))
    if cfg.max_update_ratio is not None and ratio is not None:
        too_big = ~(jnp.asarray(ratio, jnp.float32) <= cfg.max_update_ratio)  # NaN counts as too big
        reason = jnp.where(reason != 0, reason, jnp.where(too_big, 5, 0))
    ok = reason == 0

    def ema(old, new):
        # The first good step sets the mean; later ones decay into it.
        mixed = jnp.where(state.good_steps == 0, new, cfg.ema_decay * old + (1 - cfg.ema_decay) * new)
        return jnp.where(ok, mixed, old)

    bad_in_a_row = jnp.where(ok, 0, state.bad_in_a_row + 1)
    if cfg.policy == "halt":
        halt, skipped = ~ok, state.skipped
    else:
        halt = bad_in_a_row > cfg.max_skips
        skipped = state.skipped + jnp.where(ok | halt, 0, 1)
    new_state = DivergenceState(
        loss_ema=ema(state.loss_ema, loss), grad_norm_ema=ema(state.grad_norm_ema, grad_norm),
        good_steps=state.good_steps + ok.astype(jnp.int32), bad_in_a_row=bad_in_a_row.astype(jnp.int32),
        skipped=skipped.astype(jnp.int32), reason=reason.astype(jnp.int32), halt=halt | state.halt)
    return ok, new_state


def keep_if_ok(ok: jax.Array, new_tree, old_tree):
    """`new_tree` where ok, else `old_tree` (params, optimizer state): a skipped update.
    Both trees must have the same structure; the select runs on device."""
    return jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_tree, old_tree)


def describe(state, step: int, metrics: dict) -> str:
    """One line for the loop's halt message, from host copies of the guard state and of the
    step's metrics ("loss", "grad_norm", and "loss/<term>" per loss term, as engine/train/step.py
    reports them); names the loss terms that are non-finite or spiked."""
    code = int(state.reason)
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    terms = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("loss/")}
    text = f"step {step}: {REASONS.get(code, 'bad step')}"
    if code == 1:
        bad = [name for name, v in terms.items() if not math.isfinite(v)]
        text += f" in loss term {', '.join(bad)}" if bad else ""
    elif code == 3 and len(terms) > 1:
        text += f" (largest term: {max(terms, key=lambda k: abs(terms[k]))})"
    text += f" (loss {loss:.6g}, gradient norm {grad_norm:.6g}"
    if code in (3, 4) and int(state.good_steps):
        mean = float(state.loss_ema if code == 3 else state.grad_norm_ema)
        text += f", running mean {mean:.6g}"
    text += ")"
    if int(state.skipped) or int(state.bad_in_a_row) > 1:
        text += f"; {int(state.bad_in_a_row)} bad steps in a row, {int(state.skipped)} skipped in all"
    return text
