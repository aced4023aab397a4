"""Loss terms: a dict name -> fn; the train step sums them and logs each on its own.

Every term has the signature `fn(params, outputs, batch, extra) -> (scalar, aux)`:
  params   the current params (regularisers such as EWC / L2-SP read them),
  outputs  the model's output dict (`logits`, `vocab`, `predictions`, `query_embeddings`, ...),
  batch    the batch dict (see the batch contract; `example_mask` [B] is always there),
  extra    `TrainState.extra`, a dict of pytrees a term may need (anchors, Fisher); {} if none,
  aux      dict of scalar metrics, logged as "<term>/<key>".
Adding a term is `losses["ewc"] = ewc_term(...)`. The task's own term is named "task".
Padding rows (`example_mask` 0) contribute nothing; labels -100 are ignored.

The train step asks LM / MLM models for `vocab` (tenure.models.heads.Vocab: hidden, table, bias)
instead of logits; `vocab_ce` then computes the cross-entropy and its gradient a chunk of
positions at a time (labelled positions first, chunks past the last label skipped), so the
fp32 [B, L, V] logits, log-softmax and their gradient never exist at once. Given `logits`
(eval-style outputs, token classification), the same terms use the plain path.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tenure.models.heads import Vocab
from tenure.models.layers import vocab_logits

from tenure.engine.data.batch_spec import IGNORE

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


# Tokens (rows x positions) per chunk of `vocab_ce`: each chunk holds LM_CHUNK_TOKENS x V fp32
# logits (GPT-2, 256 tokens: 51 MB). Chosen by measurement (docs/performance.md).
LM_CHUNK_TOKENS = 256


def _vocab_token_ce(vocab: Vocab, targets_BxL, example_mask_B):
    valid_BxL = (targets_BxL != IGNORE).astype(jnp.float32) * example_mask_B[:, None].astype(jnp.float32)
    chunk = max(1, LM_CHUNK_TOKENS // targets_BxL.shape[0])
    nll_sum, hits = vocab_ce(vocab, jnp.where(targets_BxL == IGNORE, 0, targets_BxL), valid_BxL, chunk)
    count = valid_BxL.sum()
    aux = {"accuracy": hits / jnp.maximum(count, 1.0), "tokens": count}
    return nll_sum / jnp.maximum(count, 1.0), aux


def token_ce(params, outputs, batch, extra):
    """Token classification and MLM: mean CE over labelled (!= -100) tokens of real examples."""
    del params, extra
    if "vocab" in outputs:
        return _vocab_token_ce(outputs["vocab"], batch["labels"], batch["example_mask"])
    return _token_ce(outputs["logits"], batch["labels"], batch["example_mask"])


def causal_lm(params, outputs, batch, extra):
    """Next-token CE: position t predicts labels[t+1]; -100 (prompt, pad) ignored."""
    del params, extra
    labels_BxL = batch["labels"]
    if "vocab" in outputs:  # the last position predicts nothing
        targets_BxL = jnp.concatenate([labels_BxL[:, 1:], jnp.full_like(labels_BxL[:, :1], IGNORE)], axis=1)
        return _vocab_token_ce(outputs["vocab"], targets_BxL, batch["example_mask"])
    return _token_ce(outputs["logits"][:, :-1], labels_BxL[:, 1:], batch["example_mask"])


def vocab_ce(vocab: Vocab, targets_BxL, weights_BxL, chunk: int):
    """(sum of w * nll, sum of w * [argmax == target]) over positions, with logits =
    vocab_logits(vocab), computed at most `chunk` positions at a time (all rows together; the
    length is split into equal chunks).

    Positions with weight 0 carry no loss and no gradient: each row's weighted positions are
    moved to the front (stable), and chunks past the longest row's count are skipped
    (`lax.cond`), so MLM pays for its ~15% labelled tokens and SFT not for its prompts. The
    gradient is computed in the forward pass, chunk by chunk (softmax - one-hot, times w):
    the loss is linear in it, so the backward pass only scales it by the incoming cotangent.
    Gradients flow to hidden, table and bias; none to the targets or weights."""
    length = targets_BxL.shape[1]
    num = -(-length // max(1, min(chunk, length)))
    return _vocab_ce(-(-length // num), vocab, targets_BxL, weights_BxL)


def _layout(vocab: Vocab, targets_BxL, weights_BxL, chunk: int):
    """Weighted positions first, padded to whole chunks, chunk-major: (h [N, B, C, D],
    targets [N, B, C], weights [N, B, C], live_N (bool: the chunk holds a weighted position),
    order_BxL (the permutation, to put gradients back))."""
    rows, length = targets_BxL.shape
    num = -(-length // chunk)
    live_BxL = weights_BxL != 0
    order_BxL = jnp.argsort(jnp.where(live_BxL, 0, 1), axis=1, stable=True)
    longest = live_BxL.sum(axis=1).max()

    def arrange(x):
        x = jnp.take_along_axis(x, order_BxL.reshape(order_BxL.shape + (1,) * (x.ndim - 2)), axis=1)
        x = jnp.pad(x, [(0, 0), (0, num * chunk - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(rows, num, chunk, *x.shape[2:]), 1, 0)

    live_N = jnp.arange(num) * chunk < longest
    return arrange(vocab.hidden), arrange(targets_BxL), arrange(weights_BxL), live_N, order_BxL


def _chunk_stats(logits_BxCxV, targets_BxC, weights_BxC):
    """(log-sum-exp [B, C], weighted nll sum, weighted hit sum) of one chunk."""
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    hit_BxC = (jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC).astype(jnp.float32)
    return lse_BxC, ((lse_BxC - target_BxC) * weights_BxC).sum(), (hit_BxC * weights_BxC).sum()


def _vocab_ce_fwd(chunk, vocab: Vocab, targets_BxL, weights_BxL, with_grad=True):
    table_VxD, bias_V = vocab.table, vocab.bias
    h_NxBxCxD, t_NxBxC, w_NxBxC, live_N, order_BxL = _layout(vocab, targets_BxL, weights_BxL, chunk)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    carry = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if with_grad:
        carry += (zeros(table_VxD), None if bias_V is None else zeros(bias_V))

    def body(carry, xs):
        live, h_BxCxD, t_BxC, w_BxC = xs

        def run(carry):
            logits_BxCxV = vocab_logits(h_BxCxD, table_VxD, bias_V)
            lse_BxC, nll, hits = _chunk_stats(logits_BxCxV, t_BxC, w_BxC)
            out = (carry[0] + nll, carry[1] + hits)
            if not with_grad:
                return out, jnp.zeros((), h_BxCxD.dtype)
            # d(sum w * nll) / d logits = w * (softmax - one_hot(target))
            vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2)
            p_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
            dlogits_BxCxV = (jnp.where(vocab_ids == t_BxC[..., None], p_BxCxV - 1.0, p_BxCxV)
                             * w_BxC[..., None])
            # The two gradient dots in the compute dtype, as autodiff of vocab_logits would do
            # (in bf16, oneDNN runs bf16 -> bf16 dots several times faster than bf16 -> fp32);
            # the table gradient is summed over chunks in fp32.
            d_BxCxV = dlogits_BxCxV.astype(table_VxD.dtype)
            dh_BxCxD = jnp.einsum("bcv,vd->bcd", d_BxCxV, table_VxD)
            dtable_VxD = carry[2] + jnp.einsum("bcv,bcd->vd", d_BxCxV, h_BxCxD.astype(table_VxD.dtype))
            dbias_V = None if bias_V is None else carry[3] + dlogits_BxCxV.sum(axis=(0, 1))
            return out + (dtable_VxD, dbias_V), dh_BxCxD.astype(h_BxCxD.dtype)

        def skip(carry):
            return carry, (jnp.zeros(h_BxCxD.shape, h_BxCxD.dtype) if with_grad else jnp.zeros((), h_BxCxD.dtype))

        return jax.lax.cond(live, run, skip, carry)

    carry, dh_NxBxCxD = jax.lax.scan(body, carry, (live_N, h_NxBxCxD, t_NxBxC, w_NxBxC))
    if not with_grad:
        return carry
    nll, hits, dtable_VxD, dbias_V = carry
    rows, length = targets_BxL.shape
    dh_BxLxD = jnp.moveaxis(dh_NxBxCxD, 0, 1).reshape(rows, -1, dh_NxBxCxD.shape[-1])[:, :length]
    inverse_BxL = jnp.argsort(order_BxL, axis=1)
    dh_BxLxD = jnp.take_along_axis(dh_BxLxD, inverse_BxL[..., None], axis=1)
    return (nll, hits), Vocab(dh_BxLxD, dtable_VxD.astype(table_VxD.dtype), dbias_V)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vocab_ce(chunk, vocab: Vocab, targets_BxL, weights_BxL):
    return _vocab_ce_fwd(chunk, vocab, targets_BxL, weights_BxL, with_grad=False)


def _vocab_ce_bwd(chunk, residuals: Vocab, cotangents):
    del chunk
    g = cotangents[0]  # the hit count has no gradient
    scale = lambda x: None if x is None else (x * g).astype(x.dtype)
    return Vocab(*map(scale, residuals)), None, None


_vocab_ce.defvjp(functools.partial(_vocab_ce_fwd, with_grad=True), _vocab_ce_bwd)


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


def of_task(fn: LossFn, task_id: int, weight: float = 1.0) -> LossFn:
    """`fn` over the examples of one task in a mixed batch (`batch["task_id"]` [B]), times `weight`.
    A batch with no example of the task contributes 0."""

    def term(params, outputs, batch, extra):
        mine_B = (batch["task_id"] == task_id).astype(jnp.float32)
        value, aux = fn(params, outputs, dict(batch, example_mask=batch["example_mask"] * mine_B), extra)
        return weight * value, aux

    return term


def one_mean(parts: dict[str, tuple[LossFn, int, float]], replayed: tuple[str, ...] = ()) -> LossFn:
    """ONE mean over the units of every task in a mixed batch: `parts` maps a task name to (its
    loss fn, its task_id, its weight). The units are what each fn averages over: examples, or
    labelled tokens for token kinds (the fn's aux "tokens"); every trained task of a run has the
    same kind of unit (one head). value = sum_task weight * (sum of the task's unit losses) /
    (units of all tasks), so with weights 1 each unit weighs the same, new or replayed, and the
    replayed tasks' share of the loss and of its gradient is their share of the units (of the
    examples: the replay ratio; of the labelled tokens for token kinds). aux: per task its own
    mean ("<name>/loss") and aux values, and "replay_share" (the `replayed` tasks' units / all)."""

    def term(params, outputs, batch, extra):
        weighted_sum = jnp.zeros((), jnp.float32)
        units = jnp.zeros((), jnp.float32)
        replayed_units = jnp.zeros((), jnp.float32)
        aux = {}
        for name, (fn, task_id, weight) in parts.items():
            mask_B = batch["example_mask"] * (batch["task_id"] == task_id).astype(batch["example_mask"].dtype)
            value, task_aux = fn(params, outputs, dict(batch, example_mask=mask_B), extra)
            count = task_aux["tokens"] if "tokens" in task_aux else mask_B.astype(jnp.float32).sum()
            weighted_sum = weighted_sum + weight * value * count   # value is the task's sum / count
            units = units + count
            if name in replayed:
                replayed_units = replayed_units + count
            aux[f"{name}/loss"] = value
            aux.update({f"{name}/{k}": v for k, v in task_aux.items()})
        aux["replay_share"] = replayed_units / jnp.maximum(units, 1.0)
        return weighted_sum / jnp.maximum(units, 1.0), aux

    return term


def kl_and_weights(start_logits, logits, batch: dict, unit: str, mask_B):
    """KL(p_start || p) per example [B] or position [B, L], and the weight of each in the mean over
    `unit` (module `kl_to_start`) of the examples `mask_B` keeps."""
    at_least_f32 = lambda z: z.astype(jnp.promote_types(z.dtype, jnp.float32))  # noqa: E731
    logp_start = jax.nn.log_softmax(at_least_f32(start_logits), axis=-1)
    logp = jax.nn.log_softmax(at_least_f32(logits), axis=-1)
    kl = jnp.sum(jnp.exp(logp_start) * (logp_start - logp), axis=-1)       # [B] or [B, L]
    if unit == "example":
        return kl, mask_B
    if unit == "token":
        return kl, (batch["labels"] != IGNORE).astype(jnp.float32) * mask_B[:, None]
    # causal: position t predicts labels[t + 1]; the last position predicts nothing
    predicts = jnp.concatenate([batch["labels"][:, 1:] != IGNORE, jnp.zeros_like(batch["labels"][:, :1], bool)],
                               axis=1)
    return kl, predicts.astype(jnp.float32) * mask_B[:, None]


def kl_to_start(model: Any, unit: str, weight: float, task_ids: tuple[int, ...] | None = None) -> LossFn:
    """weight x KL(p_start(.|x) || p_theta(.|x)) (LwF, Li & Hoiem 2016; the KL-to-base term of LLM
    fine-tuning), averaged like the task loss over `unit` (the kind's `kl_unit`): "example" (seq_cls,
    pair_cls), "token" (the labelled positions: token_cls, mlm) or "causal" (the positions that
    predict a label: causal_lm, sft), of the batch's examples of `task_ids` (the stage's own tasks;
    None: every example).

    The starting model is `model` on the current params with the leaves of `extra["kl"]["anchor"]`
    (the trainable leaves' values at the start) put back, run in eval mode inside the same jitted
    step, under stop_gradient: no second copy of the frozen leaves (under LoRA the anchor is the
    adapters and the head only) and no optimizer state for it. The model's own forward pass is the
    train step's (dropout on). Memory: both models' logits [B, L, V] exist at once in fp32 for a
    vocabulary (the task loss's chunking does not apply). aux {"kl": the unscaled KL}."""
    weight = float(weight)

    def fn(params, outputs, batch, extra):
        from tenure.engine.continual.fisher import overlay   # fisher imports the kinds, which import this module
        anchor = extra["kl"]["anchor"]
        start = overlay(jax.lax.stop_gradient(params), anchor)
        start_logits = jax.lax.stop_gradient(model.apply({"params": start}, batch, deterministic=True)["logits"])
        logits = outputs["logits"] if "logits" in outputs else vocab_logits(*outputs["vocab"])
        mask_B = batch["example_mask"].astype(jnp.float32)
        if task_ids is not None:
            mask_B = mask_B * jnp.isin(batch["task_id"], jnp.asarray(task_ids)).astype(jnp.float32)
        kl, weights = kl_and_weights(start_logits, logits, batch, unit, mask_B)
        value = _masked_mean(kl, weights)
        return weight * value, {"kl": value}

    return fn


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
