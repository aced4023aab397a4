"""Metric functions: hand-computed values, perfect and worst cases, -100 handling, library parity."""
import math

import numpy as np
import pytest
import sklearn.metrics

from tenure.engine.tasks import metrics


def test_classification_hand_computed():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    result = metrics.classification_metrics(preds, labels)
    # per class precision: 0 -> 1/2, 1 -> 2/3, 2 -> 1/1; recall: 1/2, 2/2, 1/2
    precision = (1 / 2 + 2 / 3 + 1) / 3
    recall = (1 / 2 + 1 + 1 / 2) / 3
    f1s = [2 * p * r / (p + r) for p, r in [(1 / 2, 1 / 2), (2 / 3, 1), (1, 1 / 2)]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["precision_macro"] == pytest.approx(precision)
    assert result["recall_macro"] == pytest.approx(recall)
    assert result["f1_macro"] == pytest.approx(sum(f1s) / 3)


def test_classification_perfect_and_worst():
    labels = np.array([3, 1, 2, 0])
    assert metrics.classification_metrics(labels, labels) == {
        "accuracy": 1.0, "precision_macro": 1.0, "recall_macro": 1.0, "f1_macro": 1.0,
    }
    worst = metrics.classification_metrics((labels + 1) % 4, labels)
    assert worst == {"accuracy": 0.0, "precision_macro": 0.0, "recall_macro": 0.0, "f1_macro": 0.0}


@pytest.mark.parametrize("seed", range(6))
def test_classification_matches_sklearn_on_random_data(seed):
    """Classes only labelled, only predicted, or absent; ids that do not start at 0 or are strings."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    labels, preds = rng.integers(0, 6, n), rng.integers(2, 9, n)   # 0-1 never predicted, 6-8 never labelled
    if seed % 2:
        labels, preds = labels.astype(str), preds.astype(str)
    result = metrics.classification_metrics(preds, labels)
    precision, recall, f1, _ = sklearn.metrics.precision_recall_fscore_support(
        labels, preds, average="macro", zero_division=0)
    expected = {"accuracy": sklearn.metrics.accuracy_score(labels, preds), "precision_macro": precision,
                "recall_macro": recall, "f1_macro": f1}
    assert result == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_classification_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.classification_metrics([0, 1], [0, 1, 1])


def test_majority_baseline():
    assert metrics.majority_baseline([2, 2, 1, 0, 2, 1]) == pytest.approx(3 / 6)
    assert metrics.majority_baseline(["a", "b", "b", "b"]) == pytest.approx(0.75)


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def test_token_labelling_ignores_minus_100_and_counts_entities():
    # gold: [B-PER I-PER O B-LOC] and [B-LOC O]; -100 marks pads/sub-tokens
    labels = np.array([[1, -100, 2, 0, 3, -100], [3, 0, -100, -100, -100, -100]])
    # prediction junk under -100 must not matter; gets PER right, LOC in row 0 wrong type
    preds = np.array([[1, 4, 2, 0, 1, 4], [3, 0, 1, 1, 1, 1]])
    result = metrics.token_labelling_metrics(preds, labels, TAGS)
    # gold entities: PER(0-1), LOC(3), LOC(r1 0) = 3; predicted: PER(0-1), PER(3), LOC(r1 0) = 3; correct 2
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["token_accuracy"] == pytest.approx(5 / 6)


def test_token_labelling_default_vs_strict_on_stray_inside_tag():
    labels = np.array([[1, 2, 0]])  # B-PER I-PER O
    preds = np.array([[2, 2, 0]])  # I-PER I-PER O: conlleval reads an entity, IOB2 strict does not
    assert metrics.token_labelling_metrics(preds, labels, TAGS)["f1"] == pytest.approx(1.0)
    strict = metrics.token_labelling_metrics(preds, labels, TAGS, mode="strict")
    assert strict["f1"] == 0.0 and strict["recall"] == 0.0


def test_token_labelling_perfect_and_bad_mode():
    labels = np.array([[1, 2, 0, 3, 4]])
    assert metrics.token_labelling_metrics(labels, labels, TAGS)["f1"] == 1.0
    with pytest.raises(ValueError, match="'default' or 'strict'"):
        metrics.token_labelling_metrics(labels, labels, TAGS, mode="lenient")


def test_regression_known_values():
    result = metrics.regression_metrics([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])
    assert result["pearson"] == pytest.approx(1.0)
    assert result["spearman"] == pytest.approx(1.0)
    assert result["mse"] == pytest.approx((1 + 4 + 9 + 16) / 4)
    reversed_ = metrics.regression_metrics([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 10.0])
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["pearson"] < -0.7


def test_regression_constant_predictions_give_nan_correlation():
    result = metrics.regression_metrics([0.5, 0.5, 0.5], [0.0, 1.0, 2.0])
    assert math.isnan(result["pearson"]) and math.isnan(result["spearman"])
    assert result["mse"] == pytest.approx((0.25 + 0.25 + 2.25) / 3)


def test_perplexity_and_token_accuracy():
    assert metrics.perplexity(nll_sum=4 * math.log(8.0), token_count=4) == pytest.approx(8.0)
    assert metrics.perplexity(0.0, 10) == 1.0
    with pytest.raises(ValueError, match="token_count"):
        metrics.perplexity(1.0, 0)
    labels = np.array([[-100, 5, 6, -100], [7, 8, -100, -100]])
    preds = np.array([[5, 5, 0, 9], [7, 0, 1, 1]])
    assert metrics.token_accuracy(preds, labels) == pytest.approx(2 / 4)


def test_generation_identical_strings_score_max():
    texts = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    result = metrics.generation_metrics(texts, texts)
    assert result == {"bleu": pytest.approx(100.0), "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "exact_match": 1.0}


def test_generation_exact_match_ignores_whitespace_runs_only():
    result = metrics.generation_metrics([" the  cat ", "The cat", "the cat.", "a dog"], ["the cat"] * 3 + ["a dog"])
    assert result["exact_match"] == pytest.approx(2 / 4)   # case and punctuation count


def test_generation_hand_computed_rouge_and_zero_bleu():
    result = metrics.generation_metrics(["the cat"], ["the dog"])
    # unigrams: 1 of 2 overlap -> P = R = F = 1/2; no bigram overlap; BLEU 0 without 4-gram matches
    assert result["rouge1"] == pytest.approx(0.5)
    assert result["rouge2"] == 0.0
    assert result["rougeL"] == pytest.approx(0.5)
    assert result["bleu"] == 0.0


def test_retrieval_hand_computed():
    scores = np.array([
        [0.9, 0.8, 0.1, 0.0],  # relevant 0 at rank 1
        [0.9, 0.8, 0.7, 0.0],  # relevant 2 at rank 3
        [0.1, 0.2, 0.3, 0.4],  # relevant {0, 3}: ranks 4 and 1
    ])
    result = metrics.retrieval_metrics(scores, [0, 2, [0, 3]], ks=(1, 2))
    assert result["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert result["recall@1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert result["recall@2"] == pytest.approx((1 + 0 + 0.5) / 3)
    ndcg2 = (1 + 0 + 1 / (1 + 1 / math.log2(3))) / 3  # query 3: one hit at rank 1, ideal has 2
    assert result["ndcg@2"] == pytest.approx(ndcg2)


def test_retrieval_ndcg_matches_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(20, 12))
    relevant = [sorted(rng.choice(12, size=rng.integers(1, 4), replace=False)) for _ in range(20)]
    relevance = np.zeros_like(scores)
    for q, items in enumerate(relevant):
        relevance[q, items] = 1
    result = metrics.retrieval_metrics(scores, relevant, ks=(3, 12))
    assert result["ndcg@3"] == pytest.approx(sklearn.metrics.ndcg_score(relevance, scores, k=3))
    assert result["ndcg@12"] == pytest.approx(sklearn.metrics.ndcg_score(relevance, scores))
    assert result["recall@12"] == 1.0


def test_retrieval_rejects_out_of_range_relevant():
    with pytest.raises(ValueError, match="query 1: relevant index out of range"):
        metrics.retrieval_metrics(np.zeros((2, 3)), [0, 3])
