"""The task-kind registry (engine/tasks/kinds/): what a new kind must satisfy to plug in."""
import numpy as np
import pytest

from tenure.engine.tasks.kinds import HARNESS_HEAD, KINDS, LOWER_IS_BETTER, VOCAB_HEADS, kind_of
from tenure.models.tasks import HEADS


def test_every_kind_trains_a_head_the_models_build_and_is_consistent():
    assert set(KINDS) == {"seq_cls", "pair_cls", "token_cls", "regression", "causal_lm", "sft", "mlm",
                          "embedding", "lm_eval"}
    assert all(kind.head in HEADS for kind in KINDS.values())
    assert HARNESS_HEAD == "causal_lm" and VOCAB_HEADS == {"causal_lm", "mlm"}
    for name, kind in KINDS.items():
        assert kind_of(name) is kind and kind.name == name
        if kind.harness:        # scored by lm-eval: no data, no loss, no metrics of its own
            assert kind.formats == () and kind.reported == () and kind.fisher_error("sampled")
            continue
        assert kind.formats and kind.metric in kind.reported
        assert (kind.mode == "min") == (kind.metric in LOWER_IS_BETTER)
        assert kind.pack in (None, "batch", "rows", "stream") and kind.kl_unit in (None, "example", "token", "causal")
        assert callable(kind.loss(None))
    # the label layout follows the kind: one per token for the token kinds, else one per example
    assert sorted(n for n, k in KINDS.items() if k.token_labels) == ["causal_lm", "mlm", "sft", "token_cls"]
    assert [n for n, k in KINDS.items() if k.numeric_labels] == ["regression"]


def test_synthetic_labels_follow_each_kinds_label_layout():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 100, (2, 6)).astype(np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    causal = KINDS["causal_lm"].synthetic_labels((2, 6), np.int32, ids, mask, rng, 3, 0.15)
    assert np.array_equal(causal, np.where(mask == 1, ids, -100))        # the tokens themselves
    mlm = KINDS["mlm"].synthetic_labels((2, 6), np.int32, ids, mask, rng, 3, 1.0)
    assert np.array_equal(mlm, np.where(mask == 1, ids, -100))           # every real token chosen at p = 1
    tags = KINDS["token_cls"].synthetic_labels((2, 6), np.int32, ids, mask, rng, 3, 0.15)
    assert set(tags[mask == 1]) <= {0, 1, 2} and set(tags[mask == 0]) == {-100}
    classes = KINDS["seq_cls"].synthetic_labels((2,), np.int32, ids, mask, rng, 3, 0.15)
    assert classes.shape == (2,) and set(classes) <= {0, 1, 2}
    assert KINDS["regression"].synthetic_labels((2,), np.float32, ids, mask, rng, 3, 0.15).dtype == np.float32


def test_nothing_to_score_is_refused_naming_max_length():
    """An SFT split whose completions data.max_length cuts off entirely: one line, not a division by 0."""
    from tenure.models.errors import TenureError
    got = {"nll": np.zeros(3), "count": np.zeros(3), "correct": np.zeros(3)}
    with pytest.raises(TenureError, match="no labelled token to score in 3 examples: data.max_length cuts off"):
        KINDS["sft"].scores(got, None)


def test_a_masked_gold_class_has_no_loss():
    """Class-incremental: a task whose classes the shared head does not have yet scores accuracy 0
    and no loss (the mask's logit would make it ~1e9)."""
    import jax.numpy as jnp

    from tenure.models.tasks import MASKED_LOGIT
    kind = KINDS["seq_cls"]
    logits = jnp.array([[2.0, 1.0, MASKED_LOGIT], [0.5, 1.5, MASKED_LOGIT]])
    batch = {"labels": jnp.array([2, 2]), "example_mask": jnp.ones(2)}
    got = {k: np.asarray(v) for k, v in kind.reduce({"logits": logits}, batch).items()}
    scores = kind.scores(got, None)
    assert scores["accuracy"] == 0.0 and "loss" not in scores
    batch["labels"] = jnp.array([0, 1])
    got = {k: np.asarray(v) for k, v in kind.reduce({"logits": logits}, batch).items()}
    expected = -np.log(np.exp(2) / (np.exp(2) + np.exp(1)))
    assert kind.scores(got, None)["loss"] == pytest.approx(expected, rel=1e-5)
