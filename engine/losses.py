"""Loss terms: a dict name -> fn; the train step sums them and logs each on its own.

Every term has the signature `fn(params, outputs, batch, extra) -> (scalar, aux)`:
  params   the current params (regularisers such as EWC / L2-SP read them),
  outputs  the model's output dict (`logits`, `predictions`, `query_embeddings`, ...),
  batch    the batch dict (see the batch contract; `example_mask` [B] is always there),
  extra    `TrainState.extra`, a dict of pytrees a term may need (anchors, Fisher); {} if none,
  aux      dict of scalar metrics, logged as "<term>/<key>".
Adding a term is `losses["ewc"] = ewc_term(...)`. The task's own term is named "task".
Padding rows (`example_mask` 0) contribute nothing; labels -100 are ignored.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from models.kinds import KINDS

IGNORE = -100
LossFn = Callable[[Any, dict, dict, dict], tuple[jax.Array, dict[str, jax.Array]]]


def _masked_mean(values, weights):
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _nll_and_correct(logits, labels):
    """Per-position negative log-likelihood and argmax hit (labels already made safe)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return nll, (jnp.argmax(logp, axis=-1) == labels).astype(jnp.float32)


def classification_ce(params, outputs, batch, extra):
    """Sequence / pair classification: mean CE over real examples."""
    del params, extra
    nll_B, correct_B = _nll_and_correct(outputs["logits"], batch["labels"])
    mask_B = batch["example_mask"].astype(jnp.float32)
    return _masked_mean(nll_B, mask_B), {"accuracy": _masked_mean(correct_B, mask_B)}


def _token_ce(logits_BxLxC, labels_BxL, example_mask_B):
    valid_BxL = (labels_BxL != IGNORE).astype(jnp.float32) * example_mask_B[:, None].astype(jnp.float32)
    nll_BxL, correct_BxL = _nll_and_correct(logits_BxLxC, jnp.where(labels_BxL == IGNORE, 0, labels_BxL))
    aux = {"accuracy": _masked_mean(correct_BxL, valid_BxL), "tokens": valid_BxL.sum()}
    return _masked_mean(nll_BxL, valid_BxL), aux


def token_ce(params, outputs, batch, extra):
    """Token classification and MLM: mean CE over labelled (!= -100) tokens of real examples."""
    del params, extra
    return _token_ce(outputs["logits"], batch["labels"], batch["example_mask"])


def causal_lm(params, outputs, batch, extra):
    """Next-token CE: position t predicts labels[t+1]; -100 (prompt, pad) ignored."""
    del params, extra
    logits_BxLxV = outputs["logits"][:, :-1]
    return _token_ce(logits_BxLxV, batch["labels"][:, 1:], batch["example_mask"])


def mse(params, outputs, batch, extra):
    """Regression: mean squared error over real examples."""
    del params, extra
    err_B = outputs["predictions"].astype(jnp.float32) - batch["labels"].astype(jnp.float32)
    mask_B = batch["example_mask"].astype(jnp.float32)
    return _masked_mean(err_B**2, mask_B), {"mae": _masked_mean(jnp.abs(err_B), mask_B)}


def info_nce(temperature: float = 0.05) -> LossFn:
    """Contrastive loss: each query against every passage in the batch (its positive is passage 0
    of its own row; the other rows' passages and its own hard negatives 1..P-1 are negatives)."""

    def fn(params, outputs, batch, extra):
        del params, extra
        q_BxD = outputs["query_embeddings"].astype(jnp.float32)
        p_BxPxD = outputs["passage_embeddings"].astype(jnp.float32)
        b, p, d = p_BxPxD.shape
        mask_B = batch["example_mask"].astype(jnp.float32)
        scores_BxN = q_BxD @ p_BxPxD.reshape(b * p, d).T / temperature
        # passages of padding rows are not candidates
        candidate_N = jnp.repeat(mask_B > 0, p)
        scores_BxN = jnp.where(candidate_N[None, :], scores_BxN, -1e30)
        target_B = jnp.arange(b) * p
        nll_B, correct_B = _nll_and_correct(scores_BxN, target_B)
        return _masked_mean(nll_B, mask_B), {"accuracy": _masked_mean(correct_B, mask_B)}

    return fn


def task_loss(task_kind: str, cfg: Any = None) -> LossFn:
    """The loss of a task kind (`models.kinds`); `cfg` is the task's config (reads `temperature`)."""
    if task_kind not in KINDS:
        raise ValueError(f"unknown task kind {task_kind!r}")
    name = KINDS[task_kind].loss
    if name == "info_nce":
        return info_nce(getattr(cfg, "temperature", 0.05))
    return {"classification": classification_ce, "token": token_ce, "causal_lm": causal_lm, "mse": mse}[name]


def task_losses(task_kind: str, cfg: Any = None) -> dict[str, LossFn]:
    """{"task": fn}: the loss terms of a single-task run."""
    return {"task": task_loss(task_kind, cfg)}


def of_task(fn: LossFn, task_id: int, weight: float = 1.0) -> LossFn:
    """`fn` over the examples of one task in a mixed batch (`batch["task_id"]` [B]), times `weight`.
    A batch with no example of the task contributes 0."""

    def term(params, outputs, batch, extra):
        mine_B = (batch["task_id"] == task_id).astype(jnp.float32)
        value, aux = fn(params, outputs, dict(batch, example_mask=batch["example_mask"] * mine_B), extra)
        return weight * value, aux

    return term


def total_loss(losses: dict[str, LossFn], params, outputs, batch, extra) -> tuple[jax.Array, dict]:
    """Sum of the terms; metrics "loss/<name>" per term and "<name>/<aux>" for their aux values."""
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, fn in losses.items():
        value, aux = fn(params, outputs, batch, extra)
        total = total + value
        metrics[f"loss/{name}"] = value
        metrics.update({f"{name}/{k}": v for k, v in aux.items()})
    metrics["loss"] = total
    return total, metrics
