"""Regularisers toward earlier weights, as loss terms (`fn(params, outputs, batch, extra)`).

    losses["ewc"] = ewc_term(lam)      # extra["ewc"] = {"fisher": F, "anchor": theta*}
    losses["l2sp"] = l2sp_term(alpha)  # extra["l2sp"] = {"anchor": theta0}

Their trees are PRUNED trees (tenure.engine.continual.fisher.prune: the params' nested-dict paths, only the
penalised leaves), fp32, held in `TrainState.extra`; a leaf absent from them is not penalised
(e.g. a head added after the anchor was taken). Both compute in fp32 whatever the param dtype.
lam = 0 / alpha = 0 give a value and gradient of exactly 0 (the penalty is still computed and
logged, so the drift from the anchor is visible in a plain run).

L2-SP under LoRA penalises the change of the MERGED weight, the weight the model computes with
(W = kernel + lora_a @ lora_b * scale): a layer whose adapters are anchored contributes
||delta W||^2 = ||delta kernel + scale * (A B - A0 B0)||^2 (delta kernel = 0 when the kernel is
frozen, as in plain LoRA), not ||A - A0||^2 + ||B - B0||^2 of the adapter factors themselves.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tenure.engine.continual.fisher import pick, prune
from tenure.engine.tasks.losses import LossFn


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _need(extra: dict, name: str, keys: tuple[str, ...]) -> dict:
    section = extra.get(name) if isinstance(extra, Mapping) else None
    if section is None or any(k not in section for k in keys):
        raise ValueError(f"the {name!r} loss term needs TrainState.extra[{name!r}] with keys {', '.join(keys)}")
    return section


def ewc_penalty(params: Any, fisher: Any, anchor: Any) -> jax.Array:
    """sum_i F_i (theta_i - theta*_i)^2 over the leaves of the pruned tree `fisher` (fp32)."""
    theta = pick(params, fisher)
    anchor = pick(anchor, fisher)
    terms = jax.tree.map(lambda f, t, a: jnp.sum(_f32(f) * jnp.square(_f32(t) - _f32(a))), fisher, theta, anchor)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def distance_sq(params: Any, anchor: Any, lora_scale: float | None = None) -> jax.Array:
    """sum ||theta - theta0||^2 over the leaves of the pruned tree `anchor` (fp32); with
    `lora_scale`, a layer whose lora_a and lora_b are anchored counts the change of its merged
    weight instead (module docstring)."""
    theta = pick(params, anchor)
    return _distance_sq(theta, anchor, lora_scale)


def _distance_sq(theta: Any, anchor: Any, lora_scale: float | None) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    if lora_scale is not None and "lora_a" in anchor and "lora_b" in anchor:
        delta_IxO = lora_scale * (_f32(theta["lora_a"]) @ _f32(theta["lora_b"])
                                  - _f32(anchor["lora_a"]) @ _f32(anchor["lora_b"]))
        if "kernel" in anchor:
            delta_IxO = delta_IxO + _f32(theta["kernel"]) - _f32(anchor["kernel"])
        total = total + jnp.sum(jnp.square(delta_IxO))
        theta = {k: v for k, v in theta.items() if k not in ("lora_a", "lora_b", "kernel")}
        anchor = {k: v for k, v in anchor.items() if k not in ("lora_a", "lora_b", "kernel")}
    for key, a in anchor.items():
        if isinstance(a, Mapping):
            total = total + _distance_sq(theta[key], a, lora_scale)
        else:
            total = total + jnp.sum(jnp.square(_f32(theta[key]) - _f32(a)))
    return total


def ewc_term(lam: float) -> LossFn:
    """(lam / 2) sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick 2017, Eq. 3; with an accumulated F
    from `tenure.engine.continual.fisher.online_update` this is Online EWC). aux {"penalty": the unscaled sum}."""
    lam = float(lam)

    def fn(params, outputs, batch, extra):
        del outputs, batch
        ewc = _need(extra, "ewc", ("fisher", "anchor"))
        penalty = ewc_penalty(params, ewc["fisher"], ewc["anchor"])
        return 0.5 * lam * penalty, {"penalty": penalty}

    return fn


def l2sp_term(alpha: float, lora_scale: float | None = None) -> LossFn:
    """(alpha / 2) ||theta - theta0||^2 over the anchored leaves (L2-SP, Li et al. 2018); with
    `lora_scale` (a LoRA run's alpha / rank) adapted layers count their merged weight's change.
    aux {"distance_sq": the unscaled squared distance}."""
    alpha = float(alpha)

    def fn(params, outputs, batch, extra):
        del outputs, batch
        anchor = _need(extra, "l2sp", ("anchor",))["anchor"]
        dist = distance_sq(params, anchor, lora_scale)
        return 0.5 * alpha * dist, {"distance_sq": dist}

    return fn


def copy_f32(tree: Any) -> Any:
    # a fresh fp32 buffer (never an alias of the params: the train step donates its state)
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), tree)


def ewc_extra(fisher: Any, params: Any) -> dict:
    """extra["ewc"] for a Fisher taken at `params`: the anchor theta* is an fp32 copy of the
    params at the Fisher's paths (same shardings)."""
    return {"fisher": fisher, "anchor": copy_f32(pick(params, fisher))}


def l2sp_extra(params: Any, mask: Any) -> dict:
    """extra["l2sp"]: an fp32 copy of the leaves of `params` where `mask` is True (theta0)."""
    return {"anchor": copy_f32(prune(params, mask))}
