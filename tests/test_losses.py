"""Loss terms on hand-computed values; example_mask and ignore index respected."""
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.engine.tasks.kinds import KINDS, kind_of
from tenure.engine.tasks.losses import IGNORE, info_nce, total_loss
from tenure.models.errors import TenureError


def call(kind, outputs, batch, **cfg):
    class Cfg:
        temperature = cfg.get("temperature", 0.05)

    fn = KINDS[kind].loss(Cfg)
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
    with pytest.raises(TenureError, match="task kind 'translation': expected one of"):
        kind_of("translation")


# ----------------------------------------------------------------------------- KL to the starting model

class _TinyLM:
    """A flax module factory: logits = tanh(x W1) W2 per position ([B, L, V]) or of the mean ([B, V])."""

    @staticmethod
    def make(per_position: bool):
        import flax.linen as nn

        class Tiny(nn.Module):
            @nn.compact
            def __call__(self, batch, deterministic=True, logits=True):
                x = batch["x"] if per_position else batch["x"].mean(1)
                h = jnp.tanh(nn.Dense(6, use_bias=False, name="hidden")(x))
                h = nn.Dropout(0.1, deterministic=deterministic)(h)
                return {"logits": nn.Dense(5, use_bias=False, name="head")(h)}

        return Tiny()


def _kl_problem(per_position, seed=0):
    import jax
    rng = np.random.default_rng(seed)
    model = _TinyLM.make(per_position)
    x = rng.normal(size=(4, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 5, (4, 3) if per_position else (4,)).astype(np.int32)
    batch = {"x": x, "labels": labels, "example_mask": np.array([1, 1, 1, 0], np.float32),
             "task_id": np.array([1, 0, 1, 1], np.int32)}
    start = model.init(jax.random.key(seed), batch)["params"]
    moved = jax.tree.map(lambda p: p + 0.5 * rng.normal(size=p.shape).astype(np.float32), start)
    return model, batch, start, moved


def test_kl_to_start_value_and_its_gradient_match_a_finite_difference():
    """KL(p_start || p_theta) by hand (causal: over the positions predicting a label, of the own
    task's real examples); its gradient against a central difference in float64; 0 at the start."""
    import jax
    from tenure.engine.tasks.losses import kl_to_start

    model, batch, start, moved = _kl_problem(per_position=True)
    batch["labels"][0, 2] = IGNORE                       # row 0: positions 0 and 1 predict labels 1, 2
    term = kl_to_start(model, KINDS["causal_lm"].kl_unit, 0.7, task_ids=(1,))
    extra = {"kl": {"anchor": start}}
    outputs = model.apply({"params": moved}, batch)
    value, aux = term(moved, outputs, batch, extra)
    z_s = np.asarray(model.apply({"params": start}, batch)["logits"], np.float64)
    z = np.asarray(outputs["logits"], np.float64)
    logp_s = z_s - np.log(np.exp(z_s).sum(-1, keepdims=True))
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    kl = (np.exp(logp_s) * (logp_s - logp)).sum(-1)      # [B, L]
    # rows: 0 (own task, 1 position: t=0 predicts labels[0, 1]; t=1 predicts the ignored one), 2 (2 positions)
    used = [(0, 0), (2, 0), (2, 1)]
    want = np.mean([kl[b, t] for b, t in used])
    assert float(aux["kl"]) == pytest.approx(want, rel=1e-5) and float(value) == pytest.approx(0.7 * want, rel=1e-5)
    assert float(term(start, model.apply({"params": start}, batch), batch, extra)[0]) == pytest.approx(0, abs=1e-7)

    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
        batch64 = dict(batch, x=jnp.asarray(batch["x"], jnp.float64))
        extra64 = {"kl": {"anchor": f64(start)}}
        loss = lambda p: term(p, model.apply({"params": p}, batch64), batch64, extra64)[0]
        theta = f64(moved)
        grad = jax.grad(loss)(theta)
        direction = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(1).normal(size=a.shape)), theta)
        eps = 1e-5
        plus = loss(jax.tree.map(lambda a, d: a + eps * d, theta, direction))
        minus = loss(jax.tree.map(lambda a, d: a - eps * d, theta, direction))
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))))
    assert abs(numeric) > 1e-3 and analytic == pytest.approx(numeric, rel=1e-6)


def test_kl_weight_zero_leaves_training_bit_for_bit_unchanged():
    """Three train steps (dropout on, AdamW) with the task loss alone and with task + 0 x KL: the
    same losses and params, exactly; a weight of 0.5 changes them."""
    import jax
    import optax

    from tenure.engine.tasks.losses import classification_ce, kl_to_start
    from tenure.engine.runtime.sharding import MeshConfig, make_mesh, replicated
    from tenure.engine.train.step import init_state, make_train_step

    model, batch, start, _ = _kl_problem(per_position=False, seed=2)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    shardings = jax.tree.map(lambda _: replicated(mesh), start)
    mask = jax.tree.map(lambda _: True, start)
    tx = optax.adamw(1e-2)

    def run(losses):
        extra = {"kl": {"anchor": jax.tree.map(jnp.copy, start)}}
        state, state_shardings = init_state(jax.tree.map(jnp.copy, start), tx, 0, mesh, shardings, extra)
        step = make_train_step(model, losses, tx, mesh, state_shardings, lr_schedule=optax.constant_schedule(1e-2),
                               trainable_mask=mask)
        history = []
        for _ in range(3):
            state, metrics = step(state, batch)
            history.append(float(metrics["loss/task"]))
        return history, jax.tree.map(np.asarray, state.params)

    plain = run({"task": classification_ce})
    zero = run({"task": classification_ce, "kl": kl_to_start(model, KINDS["seq_cls"].kl_unit, 0.0)})
    half = run({"task": classification_ce, "kl": kl_to_start(model, KINDS["seq_cls"].kl_unit, 0.5)})
    assert zero[0] == plain[0]
    for a, b in zip(jax.tree.leaves(zero[1]), jax.tree.leaves(plain[1])):
        assert a.tobytes() == b.tobytes()
    assert half[0][1:] != plain[0][1:]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(half[1]), jax.tree.leaves(plain[1])))
