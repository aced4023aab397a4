"""What every task kind answers, and the shared forms most kinds take.

A kind is one frozen object; the rest of the engine asks it instead of comparing kind names:
  records    `formats` (the first is the default), `labelled` (labels form a vocabulary),
             `numeric_labels` (a float target), `token_labels` (a label per token, else per
             example), `synthetic_labels` (a benchmark batch's), `features` (records -> contract
             arrays, through the Featurizer's per-format methods), `random_features` (features
             drawn from an rng), `check_tokenizer`
  model      `head` (the model head it trains), `pooling` (its default, None: the backbone's),
             `vocab_head` (an LM head over the vocabulary), `classifies` (one class of the label
             vocabulary per example: the logits label masks restrict), `probe_head` (may be scored
             evaluation-only with a head of its own that has no trained weights), `pack` (how
             data.pack packs it: "stream" rows of the example stream, "batch" or "rows" each batch's own
             examples with per-example or per-row fields, None), `default_labels`
  training   `loss(cfg)`, `kl_unit` (what the KL to the starting model averages over; None: no
             predictive distribution)
  evaluation `reduce` (jitted: a batch -> small per-example arrays), `scores` (host metrics from
             them), `reported` (the metric names `scores` returns), `metric` / `mode` (the default
             validation metric), `generation` (also BLEU / ROUGE from generated text), `harness`
             (scored by lm-eval's harness: no data, never trained)
  Fisher     `fisher_error(mode)`, `choice_logits`, `loglik`, `labelled_tokens`, `fisher_classes`
             (exact mode sums over classes); see tenure.engine.continual.fisher for the estimators.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.data.batch_spec import IGNORE
from tenure.engine.tasks import metrics
from tenure.models.errors import TenureError

GENERATION_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match")
# Metrics where smaller is better (for eval.mode checks); all others are larger-is-better.
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mse"})


@dataclasses.dataclass(frozen=True)
class TaskKind:
    name: str
    head: str
    formats: tuple[str, ...]
    metric: str
    mode: str
    reported: tuple[str, ...]
    labelled: bool = False
    pack: str | None = None
    kl_unit: str | None = None
    pooling: str | None = None
    numeric_labels: bool = False
    random_features: bool = False
    vocab_head: bool = False
    classifies: bool = False
    probe_head: bool = False
    generation: bool = False
    harness: bool = False
    fisher_classes: bool = False
    default_labels: ClassVar[int] = 2   # head outputs when the run has no label vocabulary
    token_labels: ClassVar[bool] = False  # a label per token (else one per example)

    # -- records -----------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer) -> str | None:
        """Why this kind cannot featurise with `tokenizer`, or None."""
        return None

    def features(self, featurizer, records, locations, rngs) -> list[dict]:
        raise NotImplementedError(self.name)

    def synthetic_labels(self, shape, dtype, ids, mask, rng, num_labels: int, mlm_probability: float):
        """Labels of a synthetic benchmark batch (token ids `ids`, real positions `mask`)."""
        if len(shape) == 1:     # a class per example
            return rng.integers(0, num_labels, shape).astype(dtype)
        return np.where(mask == 1, rng.integers(0, num_labels, shape), IGNORE).astype(dtype)

    # -- training ----------------------------------------------------------------------------
    def loss(self, cfg: Any = None):
        raise NotImplementedError(self.name)

    # -- evaluation --------------------------------------------------------------------------
    def reduce(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        raise NotImplementedError(self.name)

    def scores(self, got: dict[str, np.ndarray], label_names: list[str] | None) -> dict[str, float]:
        raise NotImplementedError(self.name)

    def metric_names(self, generation: bool = False) -> set[str]:
        """The validation metrics it reports (`generation`: with generated-text metrics)."""
        return set(self.reported) | (set(GENERATION_METRICS) if generation and self.generation else set())

    def check_metric(self, metric: str, mode: str | None = None, generation: bool = False) -> str | None:
        """None when the kind reports `metric` (and `mode` agrees with it), else a one-line reason."""
        names = self.metric_names(generation)
        if metric not in names:
            return (f"eval.metric {metric!r} is not reported by task kind {self.name!r}; choose one of "
                    f"{', '.join(sorted(names))}")
        if mode is not None and (mode == "min") != (metric in LOWER_IS_BETTER):
            better = "lower" if metric in LOWER_IS_BETTER else "higher"
            return f"eval.mode {mode!r} contradicts eval.metric {metric!r}, where {better} is better"
        return None

    # -- Fisher ------------------------------------------------------------------------------
    def fisher_error(self, mode: str) -> str | None:
        return None

    def choice_logits(self, outputs: dict, temperature: float) -> dict:
        """The outputs the log-likelihood reads (embedding: its candidates' scores)."""
        return outputs

    def loglik(self, mode: str, outputs: dict, batch: dict, keys_B) -> jax.Array:
        """Per-example log p(y|x) [B] with y chosen by `mode`, up to terms constant in theta."""
        raise NotImplementedError(self.name)

    def labelled_tokens(self, batch: dict) -> jax.Array | None:
        """Labelled positions per example [B] (the Fisher's units); None: units are examples."""
        return None


def _sample_rows(keys_B, logits):
    return jax.vmap(lambda k, l: jax.random.categorical(k, l, axis=-1))(keys_B, logits)


class ClassKind(TaskKind):
    """One choice per example among C logits (classification; an embedding's candidates)."""

    def loglik(self, mode, outputs, batch, keys_B):
        logp_BxC = jax.nn.log_softmax(outputs["logits"].astype(jnp.float32), axis=-1)
        if mode == "sampled":
            y_B = _sample_rows(keys_B, jax.lax.stop_gradient(logp_BxC))
        else:   # padding rows may carry -100 (they weigh 0); an embedding's positive is candidate 0
            y_B = jnp.maximum(batch["labels"], 0) if "labels" in batch else jnp.zeros(logp_BxC.shape[:1], jnp.int32)
        return jnp.take_along_axis(logp_BxC, y_B[:, None], axis=-1)[:, 0]


class TokenKind(TaskKind):
    """Labels per token (-100: none); causal kinds predict position t + 1 from position t."""
    token_labels = True
    causal: ClassVar[bool] = False

    def _logp_and_labels(self, logits, labels):
        if self.causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels

    def fisher_error(self, mode):
        if mode == "exact" and self.vocab_head:
            return f"fisher: exact Fisher over a vocabulary is infeasible; use sampled or empirical (kind {self.name!r})"
        if mode == "exact":
            return (f"fisher: exact {self.name} Fisher needs a backward pass per (token, class); use "
                    "sampled (unbiased for the factorised Fisher) or empirical")
        return None

    def loglik(self, mode, outputs, batch, keys_B):
        logp_BxTxC, labels_BxT = self._logp_and_labels(outputs["logits"], batch["labels"])
        valid_BxT = labels_BxT != IGNORE
        if mode == "sampled":
            y_BxT = _sample_rows(keys_B, jax.lax.stop_gradient(logp_BxTxC))
        else:
            y_BxT = jnp.where(valid_BxT, labels_BxT, 0)
        token_BxT = jnp.take_along_axis(logp_BxTxC, y_BxT[..., None], axis=-1)[..., 0]
        return jnp.where(valid_BxT, token_BxT, 0.0).sum(-1)

    def labelled_tokens(self, batch):
        labels_BxT = batch["labels"][:, 1:] if self.causal else batch["labels"]
        return (labels_BxT != IGNORE).sum(-1).astype(jnp.int32)

    def token_nll(self, logits_BxLxV, labels_BxL):
        """(summed nll, labelled count, argmax hits) per example [B]."""
        logp_BxLxV, labels_BxL = self._logp_and_labels(logits_BxLxV, labels_BxL)
        valid_BxL = labels_BxL != IGNORE
        safe_BxL = jnp.where(valid_BxL, labels_BxL, 0)
        nll_BxL = -jnp.take_along_axis(logp_BxLxV, safe_BxL[..., None], axis=-1)[..., 0]
        correct_BxL = jnp.argmax(logp_BxLxV, axis=-1) == safe_BxL
        return (nll_BxL * valid_BxL).sum(-1), valid_BxL.sum(-1), (correct_BxL & valid_BxL).sum(-1)


class LanguageKind(TokenKind):
    """A distribution over the vocabulary per labelled token: perplexity, token accuracy."""

    def reduce(self, outputs, batch):
        nll_B, count_B, correct_B = self.token_nll(outputs["logits"], batch["labels"])
        return dict(nll=nll_B, count=count_B, correct=correct_B, mask=batch["example_mask"])

    def scores(self, got, label_names):
        count = float(got["count"].sum())
        if count == 0:  # nothing to score: every labelled token (an SFT completion) was truncated away
            raise TenureError(f"no labelled token to score in {len(got['count'])} examples: data.max_length cuts "
                              "off every one (an SFT example's completion comes after its prompt); raise it")
        return {"perplexity": metrics.perplexity(float(got["nll"].sum()), count),
                "loss": float(got["nll"].sum()) / count,
                "token_accuracy": float(got["correct"].sum()) / count}


LANGUAGE_METRICS = ("perplexity", "loss", "token_accuracy")


def unknown_kind(name: str, known) -> TenureError:
    return TenureError(f"task kind {name!r}: expected one of {', '.join(sorted(known))}")
