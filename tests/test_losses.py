"""Loss terms on hand-computed values; example_mask and ignore index respected."""
import jax.numpy as jnp
import numpy as np
import pytest

from engine.losses import IGNORE, info_nce, task_losses, total_loss


def call(kind, outputs, batch, **cfg):
    class Cfg:
        temperature = cfg.get("temperature", 0.05)

    fn = task_losses(kind, Cfg)["task"]
    value, aux = fn({}, outputs, batch, {})
    return float(value), {k: float(v) for k, v in aux.items()}


def test_classification_ce_known_values_and_padding_rows():
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0], [50.0, -50.0]])
    batch = {"labels": jnp.array([0, 0, 1]), "example_mask": jnp.array([1.0, 1.0, 0.0])}
    value, aux = call("seq_cls", {"logits": logits}, batch)
    # row 0: log 2; row 1: -log(3/4); row 2 is padding (its huge loss must not count)
    assert value == pytest.approx((np.log(2) - np.log(0.75)) / 2, rel=1e-6)
    assert aux["accuracy"] == 1.0  # the padding row is wrong, and does not count
    assert call("pair_cls", {"logits": logits}, batch)[0] == value


def test_token_ce_ignores_minus_100_and_padding_rows():
    logits = jnp.zeros((2, 3, 4)).at[0, 0, 1].set(np.log(5.0))
    labels = jnp.array([[1, IGNORE, 2], [3, 3, 3]])
    batch = {"labels": labels, "example_mask": jnp.array([1.0, 0.0])}
    value, _ = call("token_cls", {"logits": logits}, batch)
    # token (0,0): p = 5/8; token (0,2): uniform 1/4; row 1 is padding
    assert value == pytest.approx((-np.log(5 / 8) + np.log(4)) / 2, rel=1e-6)
    assert call("mlm", {"logits": logits}, batch)[0] == value


def test_causal_lm_shifts_by_one():
    # position t predicts labels[t+1]; position 0 leans to token 2, position 2 has no target
    logits = jnp.zeros((1, 3, 4)).at[0, 0, 2].set(2.0).at[0, 2, 1].set(9.0)
    batch = {"labels": jnp.array([[IGNORE, 2, IGNORE]]), "example_mask": jnp.array([1.0])}
    value, aux = call("causal_lm", {"logits": logits}, batch)
    assert value == pytest.approx(-np.log(np.exp(2.0) / (np.exp(2.0) + 3)), rel=1e-6)
    assert aux["accuracy"] == 1.0
    assert call("sft", {"logits": logits}, batch)[0] == value


def test_mse_with_padding():
    batch = {"labels": jnp.array([1.0, 2.0, 100.0]), "example_mask": jnp.array([1.0, 1.0, 0.0])}
    value, aux = call("regression", {"predictions": jnp.array([2.0, 4.0, 0.0])}, batch)
    assert value == pytest.approx((1 + 4) / 2) and aux["mae"] == pytest.approx(1.5)


def test_info_nce_identical_embeddings_is_log_candidates():
    q = jnp.ones((4, 8)) / np.sqrt(8)
    p = jnp.ones((4, 2, 8)) / np.sqrt(8)
    batch = {"example_mask": jnp.array([1.0, 1.0, 1.0, 0.0])}
    value, _ = call("embedding", {"query_embeddings": q, "passage_embeddings": p}, batch)
    # all scores equal; the padding row's 2 passages are not candidates: log(3 rows * 2)
    assert value == pytest.approx(np.log(6.0), rel=1e-6)


def test_info_nce_hand_computed_with_hard_negative():
    q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    p = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [B=2, P=2, D]
    t = 0.5
    value, aux = info_nce(t)({}, {"query_embeddings": q, "passage_embeddings": p},
                             {"example_mask": jnp.ones(2)}, {})
    # each query: scores over 4 passages = [1, 0, 0, 1]/t (own positive + one other at 1)
    expected = -np.log(np.exp(2.0) / (2 * np.exp(2.0) + 2 * np.exp(0.0)))
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_total_loss_sums_terms_and_reports_each():
    def const(v):
        return lambda params, outputs, batch, extra: (jnp.asarray(v), {"x": jnp.asarray(2 * v)})

    total, metrics = total_loss({"task": const(1.5), "l2sp": const(0.25)}, {}, {}, {}, {})
    assert float(total) == 1.75 and float(metrics["loss"]) == 1.75
    assert float(metrics["loss/task"]) == 1.5 and float(metrics["loss/l2sp"]) == 0.25
    assert float(metrics["l2sp/x"]) == 0.5
    with pytest.raises(ValueError, match="unknown task kind"):
        task_losses("translation")
