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


def task_losses(task_kind: str, cfg: Any = None) -> dict[str, LossFn]:
    """{"task": fn} for a task kind; `cfg` is the `task` config section (reads `temperature`)."""
    if task_kind in ("seq_cls", "pair_cls"):
        return {"task": classification_ce}
    if task_kind in ("token_cls", "mlm"):
        return {"task": token_ce}
    if task_kind in ("causal_lm", "sft"):
        return {"task": causal_lm}
    if task_kind == "regression":
        return {"task": mse}
    if task_kind == "embedding":
        return {"task": info_nce(getattr(cfg, "temperature", 0.05))}
    raise ValueError(f"unknown task kind {task_kind!r}")


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
