"""Optimizer: frozen leaves get no state, LLRD ratios, decay mask, clipping, schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tenure.engine.train.optim import OptimConfig, build_optimizer, build_schedule, decay_mask
from tenure.engine.train.trainability import TrainableConfig, compile_trainability
from test_trainability import L, fake_params


def state_size(opt_state):
    return sum(int(np.size(x)) for x in jax.tree.leaves(opt_state))


def ones_like(tree):
    return jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), tree)


def test_head_only_adam_keeps_no_moments_for_frozen_leaves():
    params = fake_params()
    cfg = OptimConfig(name="adamw")
    full = compile_trainability(params, TrainableConfig(), L)
    head = compile_trainability(params, TrainableConfig(mode="head"), L)
    full_size = state_size(build_optimizer(cfg, full, 10).init(params))
    head_size = state_size(build_optimizer(cfg, head, 10).init(params))
    # Adam keeps mu and nu per trainable leaf: the difference is 2x the frozen count exactly
    assert full_size - head_size == 2 * head.frozen_count
    assert head_size == 2 * head.trainable_count + 2  # + step counters of adam and the schedule


def test_frozen_updates_are_exactly_zero_and_clip_sees_trainable_only():
    params = fake_params()
    tr = compile_trainability(params, TrainableConfig(mode="head"), L)
    tx = build_optimizer(OptimConfig(name="sgd", lr=1.0, weight_decay=0.0, clip_norm=1.0,
                                     schedule="constant"), tr, 10)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 3.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = {jax.tree_util.keystr(p): np.asarray(u) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    for path, u in flat.items():
        if "'head'" not in path:
            assert np.array_equal(u, np.zeros_like(u)), path
    # head: 10 leaves of grad 3 -> norm 3*sqrt(10), clipped to 1: each update -1/sqrt(10)
    head_update = np.asarray(updates["head"]["classifier"]["kernel"])
    np.testing.assert_allclose(head_update, -1 / np.sqrt(10), rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-6)


def test_llrd_sgd_update_ratio_equals_multiplier():
    params = fake_params()
    decay = 0.5
    tr = compile_trainability(params, TrainableConfig(llrd={"decay": decay}), L)
    tx = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=0.0, clip_norm=None,
                                     schedule="constant"), tr, 10)
    updates, _ = tx.update(ones_like(params), tx.init(params), params)
    head = float(updates["head"]["classifier"]["kernel"][0, 0])
    assert head == pytest.approx(-0.1, rel=1e-7)
    for layer in range(L):
        got = float(updates["backbone"][f"layers_{layer}"]["attention"]["query"]["kernel"][0, 0])
        assert got / head == pytest.approx(decay ** (L - layer), rel=1e-6)
    emb = float(updates["backbone"]["embeddings"]["word_embeddings"]["embedding"][0, 0])
    assert emb / head == pytest.approx(decay ** (L + 1), rel=1e-6)


def test_weight_decay_skips_biases_and_norms():
    mask = decay_mask(fake_params())
    assert mask["backbone"]["layers_0"]["attention"]["query"]["kernel"]
    assert mask["backbone"]["embeddings"]["word_embeddings"]["embedding"]
    assert not mask["backbone"]["layers_0"]["attention"]["query"]["bias"]
    assert not mask["backbone"]["layers_0"]["attention_norm"]["scale"]
    assert not mask["backbone"]["embeddings"]["norm"]["scale"]
    assert not mask["backbone"]["final_norm"]["scale"]
    # AdamW with zero grads: only decayed leaves move, by lr * wd * param
    params = jax.tree.map(lambda x: np.full(x.shape, 2.0, np.float32), fake_params())
    tr = compile_trainability(params, TrainableConfig(), L)
    tx = build_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, schedule="constant", clip_norm=None), tr, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    layer = updates["backbone"]["layers_0"]
    np.testing.assert_allclose(layer["attention"]["value"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    assert not np.any(np.asarray(layer["attention"]["value"]["bias"]))
    assert not np.any(np.asarray(layer["attention_norm"]["scale"]))


@pytest.mark.parametrize("schedule,want", [
    ("linear", {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 5e-4, 110: 0.0}),
    ("cosine", {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 5e-4, 110: 0.0}),
    ("constant", {0: 0.0, 5: 5e-4, 10: 1e-3, 60: 1e-3, 110: 1e-3}),
])
def test_schedule_values(schedule, want):
    sched = build_schedule(OptimConfig(lr=1e-3, schedule=schedule, warmup_steps=10), total_steps=110)
    for step, lr in want.items():
        assert float(sched(step)) == pytest.approx(lr, abs=1e-9), step
    ratio = build_schedule(OptimConfig(lr=1e-3, schedule="linear", warmup_ratio=0.1), total_steps=110)
    assert float(ratio(11)) == pytest.approx(1e-3)
    # cosine at a quarter of the decay: lr * (1 + cos(pi/4)) / 2
    cos = build_schedule(OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10), total_steps=110)
    assert float(cos(35)) == pytest.approx(1e-3 * (1 + np.cos(np.pi / 4)) / 2, rel=1e-5)


def test_config_rejects_two_warmups():
    with pytest.raises(ValueError, match="warmup_steps or optim.warmup_ratio"):
        OptimConfig(warmup_steps=5, warmup_ratio=0.1)


def test_adafactor_builds_and_steps():
    params = fake_params()
    tr = compile_trainability(params, TrainableConfig(mode="last_n", last_n=1), L)
    tx = build_optimizer(OptimConfig(name="adafactor", lr=1e-2), tr, 10)
    updates, _ = tx.update(ones_like(params), tx.init(params), params)
    assert np.any(np.asarray(updates["backbone"]["layers_2"]["attention"]["query"]["kernel"]))
    assert not np.any(np.asarray(updates["backbone"]["layers_0"]["attention"]["query"]["kernel"]))
