"""Evaluation metrics: pure functions over predictions collected as numpy arrays.

Every function returns plain Python floats (a dict of named floats where there are
several), so results can go straight to TensorBoard, JSON and tables. Well-kept
libraries do the work where they exist: seqeval (entity spans), scipy (correlations),
sacrebleu (BLEU) and rouge-score (ROUGE), each imported by the function that uses it (together
they were 0.9 s of every `tenure` start-up). Classification counts and retrieval ranks are a few
lines of numpy, checked against scikit-learn's ``precision_recall_fscore_support`` and
``ndcg_score`` in the tests.
"""
from collections.abc import Sequence

import numpy as np

from tenure.engine.data.batch_spec import IGNORE


def _flat(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        raise ValueError(f"{name} is empty: nothing to evaluate")
    return array.reshape(-1)


def _same_shape(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}")


# --- classification -----------------------------------------------------------------


def classification_metrics(pred_ids, label_ids) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 over class ids.

    Macro averages weigh every class that occurs in labels or predictions equally;
    a class never predicted scores precision 0, one never labelled recall 0, and F1 is
    2TP / (2TP + FP + FN): sklearn's ``precision_recall_fscore_support(average="macro",
    zero_division=0)``, which the tests check it against. Counted with numpy because importing
    scikit-learn took 2.2 s of every classification run's start (AVX2 Zen 3).
    """
    preds, labels = np.asarray(pred_ids), np.asarray(label_ids)
    _same_shape(preds, labels, "pred_ids", "label_ids")
    preds, labels = _flat(preds, "pred_ids"), _flat(labels, "label_ids")
    classes, index = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    true_k, pred_k = index[:labels.size], index[labels.size:]
    hit = true_k == pred_k
    tp = np.bincount(true_k[hit], minlength=classes.size).astype(np.float64)
    labelled = np.bincount(true_k, minlength=classes.size)
    predicted = np.bincount(pred_k, minlength=classes.size)

    def ratio(num, den):
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return {
        "accuracy": float(hit.mean()),
        "precision_macro": float(ratio(tp, predicted).mean()),
        "recall_macro": float(ratio(tp, labelled).mean()),
        "f1_macro": float(ratio(2 * tp, labelled + predicted).mean()),
    }


def majority_baseline(label_ids) -> float:
    """Accuracy of always predicting the most frequent label (ids or strings)."""
    labels = _flat(label_ids, "label_ids")
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / labels.size)


# --- token labelling (BIO) ----------------------------------------------------------


def _tag_sequences(ids_BxL: np.ndarray, keep_BxL: np.ndarray, tag_names: Sequence[str]):
    table = np.asarray(tag_names, dtype=object)
    return [list(table[row[keep]]) for row, keep in zip(ids_BxL, keep_BxL)]


def token_labelling_metrics(
    pred_ids_BxL, label_ids_BxL, tag_names: Sequence[str], mode: str = "default"
) -> dict[str, float]:
    """Entity-level precision, recall, F1 (micro over entities) with seqeval, plus token accuracy.

    Positions whose label is -100 (padding, special tokens, non-first sub-tokens) are
    dropped from both predictions and labels before decoding spans. ``tag_names[i]`` is
    the BIO tag of id ``i`` (e.g. ``["O", "B-PER", "I-PER"]``).

    ``mode="default"`` is seqeval's conlleval-compatible decoding: an ``I-X`` that
    follows ``O`` still opens an entity. ``mode="strict"`` applies the IOB2 scheme: an
    entity must start with ``B-X`` and a stray ``I-X`` is not an entity.
    """
    if mode not in ("default", "strict"):
        raise ValueError(f"token labelling mode must be 'default' or 'strict', got {mode!r}")
    preds, labels = np.asarray(pred_ids_BxL), np.asarray(label_ids_BxL)
    _same_shape(preds, labels, "pred_ids_BxL", "label_ids_BxL")
    if labels.ndim != 2:
        raise ValueError(f"expected [batch, length] label ids, got shape {labels.shape}")
    keep_BxL = labels != IGNORE
    if not keep_BxL.any():
        raise ValueError("every label is -100: nothing to evaluate")
    true_tags = _tag_sequences(labels, keep_BxL, tag_names)
    pred_tags = _tag_sequences(preds, keep_BxL, tag_names)
    from seqeval.metrics import f1_score as seqeval_f1
    from seqeval.metrics import precision_score as seqeval_precision
    from seqeval.metrics import recall_score as seqeval_recall
    from seqeval.scheme import IOB2
    scheme = {"mode": "strict", "scheme": IOB2} if mode == "strict" else {}
    common = dict(zero_division=0, **scheme)
    return {
        "precision": float(seqeval_precision(true_tags, pred_tags, **common)),
        "recall": float(seqeval_recall(true_tags, pred_tags, **common)),
        "f1": float(seqeval_f1(true_tags, pred_tags, **common)),
        "token_accuracy": float((preds[keep_BxL] == labels[keep_BxL]).mean()),
    }


# --- regression ---------------------------------------------------------------------


def regression_metrics(predictions, targets) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy) and mean squared error.

    A correlation is NaN when either side is constant (it is undefined there).
    """
    preds = _flat(predictions, "predictions").astype(np.float64)
    golds = _flat(targets, "targets").astype(np.float64)
    _same_shape(preds, golds, "predictions", "targets")
    constant = np.ptp(preds) == 0 or np.ptp(golds) == 0 or preds.size < 2
    import scipy.stats
    pearson = np.nan if constant else scipy.stats.pearsonr(preds, golds).statistic
    spearman = np.nan if constant else scipy.stats.spearmanr(preds, golds).statistic
    return {
        "pearson": float(pearson),
        "spearman": float(spearman),
        "mse": float(np.mean((preds - golds) ** 2)),
    }


# --- language modelling -------------------------------------------------------------


def perplexity(nll_sum: float, token_count: float) -> float:
    """exp(summed token negative log-likelihood / number of tokens), in nats."""
    if token_count <= 0:
        raise ValueError(f"token_count must be positive, got {token_count}")
    return float(np.exp(float(nll_sum) / float(token_count)))


def token_accuracy(pred_ids, label_ids) -> float:
    """Share of labelled positions (label != -100) where the predicted id is the label."""
    preds, labels = np.asarray(pred_ids), np.asarray(label_ids)
    _same_shape(preds, labels, "pred_ids", "label_ids")
    keep = labels != IGNORE
    if not keep.any():
        raise ValueError("every label is -100: nothing to evaluate")
    return float((preds[keep] == labels[keep]).mean())


# --- generation ---------------------------------------------------------------------


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100, default 13a tokenisation), mean ROUGE-1/2/L F1 (0-1) and
    exact match (0-1: the share of hypotheses equal to their reference once whitespace runs are
    collapsed and the ends stripped; case and punctuation count).

    One reference per hypothesis. ROUGE uses rouge-score with Porter stemming.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses: nothing to evaluate")
    import sacrebleu
    from rouge_score import rouge_scorer
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    result = {"bleu": float(bleu)}
    for kind in kinds:
        result[kind] = float(np.mean([s[kind].fmeasure for s in scores]))
    result["exact_match"] = float(np.mean([" ".join(h.split()) == " ".join(r.split())
                                           for h, r in zip(hypotheses, references)]))
    return result


# --- retrieval ----------------------------------------------------------------------


def _relevance_QxC(relevant, num_queries: int, num_candidates: int) -> np.ndarray:
    if len(relevant) != num_queries:
        raise ValueError(f"{num_queries} queries in the score matrix but {len(relevant)} relevant lists")
    relevance_QxC = np.zeros((num_queries, num_candidates), dtype=bool)
    for q, items in enumerate(relevant):
        items = np.atleast_1d(np.asarray(items, dtype=np.int64))
        if items.size == 0:
            raise ValueError(f"query {q} has no relevant candidate")
        if items.min() < 0 or items.max() >= num_candidates:
            raise ValueError(f"query {q}: relevant index out of range [0, {num_candidates})")
        relevance_QxC[q, items] = True
    return relevance_QxC


def retrieval_metrics(scores_QxC, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k, MRR and nDCG@k from a score matrix, averaged over queries.

    ``scores_QxC[q, c]`` is the score of candidate ``c`` for query ``q`` (higher is
    better); ``relevant[q]`` is one index or a list of indices of the relevant
    candidates (binary relevance). Ties rank the lower candidate index first.
      recall@k = |relevant in top k| / |relevant|
      MRR      = 1 / rank of the first relevant candidate (ranks from 1)
      nDCG@k   = sum_{r<=k, rel} 1/log2(r+1) / sum_{r<=min(k,|relevant|)} 1/log2(r+1)
    """
    scores_QxC = np.asarray(scores_QxC, dtype=np.float64)
    if scores_QxC.ndim != 2:
        raise ValueError(f"expected a [queries, candidates] score matrix, got shape {scores_QxC.shape}")
    num_queries, num_candidates = scores_QxC.shape
    relevance_QxC = _relevance_QxC(relevant, num_queries, num_candidates)
    order_QxC = np.argsort(-scores_QxC, axis=1, kind="stable")
    ranked_rel_QxC = np.take_along_axis(relevance_QxC, order_QxC, axis=1)
    num_relevant_Q = relevance_QxC.sum(axis=1)
    first_hit_Q = ranked_rel_QxC.argmax(axis=1)  # 0-based rank of the first relevant
    discounts_C = 1.0 / np.log2(np.arange(2, num_candidates + 2))
    result = {"mrr": float(np.mean(1.0 / (first_hit_Q + 1)))}
    for k in ks:
        top = min(k, num_candidates)
        hits_Q = ranked_rel_QxC[:, :top].sum(axis=1)
        result[f"recall@{k}"] = float(np.mean(hits_Q / num_relevant_Q))
        dcg_Q = (ranked_rel_QxC[:, :top] * discounts_C[:top]).sum(axis=1)
        ideal_cum_C = np.cumsum(discounts_C)
        ideal_Q = ideal_cum_C[np.minimum(num_relevant_Q, top) - 1]
        result[f"ndcg@{k}"] = float(np.mean(dcg_Q / ideal_Q))
    return result
