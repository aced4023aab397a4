"""The divergence guard: NaN/Inf and spikes of loss and gradient norm, decided inside jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest

from tenure.engine.train.divergence import (DivergenceConfig, describe, guard_step, init_divergence_state, keep_if_ok,
                                            update_ratio)


def run(cfg, pairs):
    """Feeds (loss, grad_norm) pairs through a jitted guard; returns oks and the states."""
    step = jax.jit(lambda s, l, g: guard_step(cfg, s, l, g))
    state, oks, states = init_divergence_state(), [], []
    for loss, grad_norm in pairs:
        ok, state = step(state, jnp.float32(loss), jnp.float32(grad_norm))
        oks.append(bool(ok))
        states.append(jax.device_get(state))
    return oks, states


def test_non_finite_loss_or_grad_norm_halts_by_default():
    cfg = DivergenceConfig()
    oks, states = run(cfg, [(2.0, 1.0), (np.nan, 1.0)])
    assert oks == [True, False] and bool(states[1].halt) and int(states[1].reason) == 1
    oks, states = run(cfg, [(2.0, 1.0), (2.0, np.inf)])
    assert oks == [True, False] and bool(states[1].halt) and int(states[1].reason) == 2
    assert describe(states[1], 2, {"loss": 2.0, "grad_norm": float("inf")}) == (
        "step 2: non-finite gradient norm (loss 2, gradient norm inf)")


def test_spikes_after_warmup_and_the_mean_ignores_bad_steps():
    cfg = DivergenceConfig(warmup_steps=3, spike_factor=10)
    pairs = [(2.0, 1.0)] * 3 + [(25.0, 1.0)]
    oks, states = run(cfg, pairs)
    assert oks == [True, True, True, False]
    assert int(states[-1].reason) == 3 and float(states[-1].loss_ema) == pytest.approx(2.0)
    assert describe(states[-1], 4, {"loss": 25.0, "grad_norm": 1.0, "loss/task": 24.0, "loss/ewc": 1.0}) == (
        "step 4: loss spike (largest term: task) (loss 25, gradient norm 1, running mean 2)")
    # Loss spikes count from the second step; gradient-norm spikes only after warmup.
    assert run(cfg, [(2.0, 1.0), (25.0, 1.0)])[0] == [True, False]
    assert run(cfg, [(2.0, 1.0), (2.0, 1e6)])[0] == [True, True]
    # A finite loss with an exploding gradient norm (weights blowing up) is a spike too.
    oks, states = run(cfg, [(2.0, 1.0)] * 3 + [(2.5, 1e6)])
    assert oks[-1] is False and int(states[-1].reason) == 4


def test_update_larger_than_the_weights_is_refused_before_it_lands():
    cfg = DivergenceConfig()
    step = jax.jit(lambda s, l, g, r: guard_step(cfg, s, l, g, r))
    params, small, huge = {"w": jnp.ones(4)}, {"w": jnp.full(4, 1e-3)}, {"w": jnp.full(4, 1e3)}
    ok, state = step(init_divergence_state(), 0.5, 1.0, update_ratio(small, params))
    assert bool(ok)
    ok, state = step(state, 0.5, 1.0, update_ratio(huge, params))
    assert not bool(ok) and int(state.reason) == 5 and bool(state.halt)
    ok, _ = step(init_divergence_state(), 0.5, 1.0, jnp.float32(jnp.nan))
    assert not bool(ok)


def test_loss_floor_keeps_noise_near_zero_loss_from_halting():
    cfg = DivergenceConfig(warmup_steps=2)
    oks, _ = run(cfg, [(0.01, 1.0), (0.01, 1.0), (0.5, 1.0)])  # 50x the mean, but below 10 x 0.1
    assert oks == [True, True, True]


def test_skip_policy_counts_and_halts_after_max_skips_in_a_row():
    cfg = DivergenceConfig(policy="skip", max_skips=2)
    oks, states = run(cfg, [(1.0, 1.0), (np.nan, 1.0), (1.0, 1.0), (np.nan, 1.0), (np.nan, 1.0),
                            (np.nan, 1.0)])
    assert oks == [True, False, True, False, False, False]
    assert [int(s.skipped) for s in states] == [0, 1, 1, 2, 3, 3]
    assert [bool(s.halt) for s in states] == [False] * 5 + [True]
    metrics = {"loss": float("nan"), "grad_norm": 1.0, "loss/task": 0.7, "loss/l2sp": float("nan")}
    assert describe(states[-1], 6, metrics) == (
        "step 6: non-finite loss in loss term l2sp (loss nan, gradient norm 1); 3 bad steps in a row, "
        "3 skipped in all")


def test_keep_if_ok_selects_on_device():
    new, old = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
    pick = jax.jit(keep_if_ok)
    np.testing.assert_array_equal(pick(jnp.bool_(True), new, old)["w"], np.ones(3))
    np.testing.assert_array_equal(pick(jnp.bool_(False), new, old)["w"], np.zeros(3))


def test_guard_has_no_host_sync():
    cfg = DivergenceConfig()
    # Traceable with abstract values only: no concrete value is ever needed on the host.
    shapes = jax.eval_shape(lambda s, l, g: guard_step(cfg, s, l, g), init_divergence_state(),
                            jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    assert shapes[0].dtype == jnp.bool_


def test_config_refuses_bad_values():
    with pytest.raises(pydantic.ValidationError):
        DivergenceConfig(policy="ignore")
    with pytest.raises(pydantic.ValidationError):
        DivergenceConfig(max_skips=True)
    with pytest.raises(pydantic.ValidationError):
        DivergenceConfig(spike_factor=float("inf"))
    assert DivergenceConfig(spike_factor=None, grad_spike_factor=None).policy == "halt"


REAL_STEP = "tests/fixtures/bert/seq_cls"


def lr1000_stage(tmp_path):
    """(run, batch, step): the tiny BERT's first stage at lr=1000 (the first AdamW update moves
    every weight by ~1000 while the loss stays finite), its first batch, and tenure.engine.train.step.train_step
    bound to that stage's model, losses and optimizer (pass `divergence=` to guard it)."""
    import functools
    import json

    import optax

    from tenure.engine.config.schema import validate
    from tenure.engine.data.pipeline import to_global_batch
    from tenure.engine.train.step import train_step
    from tenure.engine.train.trainer import Trainer

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"word{i} thing", "label": "ab"[i % 2]}) + "\n"
                                              for i in range(32)))
    cfg = validate({"model": {"path": REAL_STEP}, "task": {"kind": "seq_cls"},
                    "data": {"train": str(tmp_path / "t.jsonl"), "max_length": 16, "batch_size": 8},
                    "optim": {"lr": 1000.0, "schedule": "constant"}, "train": {"steps": 4}})
    trainer = Trainer(cfg)
    run = trainer.build(0, trainer.start_params, {})  # the stage's model, losses, optimizer, state, data
    step = functools.partial(train_step, model=run.model, losses=run.losses, tx=run.tx,
                             lr_schedule=optax.constant_schedule(cfg.optim.lr),
                             trainable_mask=run.trainability.trainable_mask)
    return run, to_global_batch(next(run.train_iter), trainer.backbone.mesh), step


@pytest.mark.slow
def test_huge_learning_rate_on_a_real_model_is_stopped_before_the_weights_blow_up(tmp_path):
    """lr=1000 on the tiny BERT: unguarded, one AdamW step moves every weight by ~1000 while the
    loss is still finite; guarded, that first update is refused and the weights stay as they were."""
    run, batch, step = lr1000_stage(tmp_path)
    guard_cfg = DivergenceConfig()

    @jax.jit
    def guarded(state, guard, batch):
        new, metrics = step(state, batch)
        updates = jax.tree.map(lambda a, b: a - b, new.params, state.params)
        ok, guard = guard_step(guard_cfg, guard, metrics["loss"], metrics["grad_norm"],
                               update_ratio(updates, state.params))
        return keep_if_ok(ok, new, state), guard, new, metrics

    kept, guard, unguarded, metrics = guarded(run.state, init_divergence_state(), batch)
    largest = lambda params: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(params))  # noqa: E731
    assert np.isfinite(float(metrics["loss"]))  # nothing non-finite to see yet
    assert largest(unguarded.params) > 900  # what an unguarded run would have kept
    assert bool(guard.halt) and int(guard.reason) == 5
    assert largest(kept.params) == largest(run.state.params) < 10
    assert describe(jax.device_get(guard), 1, jax.device_get(metrics)).startswith(
        "step 1: update larger than the weights (loss ")


@pytest.mark.slow
def test_the_train_step_skips_a_bad_update_under_skip_and_flags_it_under_halt(tmp_path):
    """tenure.engine.train.step.train_step with the guard: lr=1000 makes the first update larger than the
    weights. Under `skip` the returned params and AdamW moments are the old ones, bit for bit,
    and the skip is counted; under `halt` the step only raises the flag (the loop stops on it
    before the state is saved or evaluated; test_run_safety checks that end to end)."""
    import functools

    run, batch, step = lr1000_stage(tmp_path)
    before = jax.device_get((run.state.params, run.state.opt_state))
    results = {}
    for policy in ("skip", "halt"):
        new, metrics = jax.jit(functools.partial(step, divergence=DivergenceConfig(policy=policy)))(run.state, batch)
        results[policy] = jax.device_get((new.params, new.opt_state)), jax.device_get(metrics)
    (kept, metrics) = results["skip"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(before)))
    assert int(metrics["divergence/skipped"]) == 1 and not bool(metrics["divergence/halt"])
    assert int(metrics["divergence/reason"]) == 5
    moved, metrics = results["halt"]
    assert bool(metrics["divergence/halt"]) and int(metrics["divergence/reason"]) == 5
    largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(moved[0]))
    assert largest > 900  # the blown-up update is in the returned state; nothing may keep it


@pytest.mark.slow
def test_the_guarded_step_writes_the_weights_in_place(tmp_path):
    """The update ratio reads the old weights; unless both its norms are ordered before the new
    weights are written over the old (donated) buffers, XLA copies every weight first (the step
    tenure train compiles had 105 such copies on MiniLM, 4.5% of its time). The compiled step
    must copy no parameter, and its ratio must still refuse lr=1000's first update."""
    import re

    run, batch, _ = lr1000_stage(tmp_path)
    hlo = run.step_fn.lower(run.state, batch).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    # Entry parameters follow the flattened arguments: the state's step, then its params.
    number = {int(i): name for name, i in re.findall(r"%(\S+) = \S+ parameter\((\d+)\)", entry)}
    params = {number[i] for i in range(1, 1 + len(jax.tree.leaves(run.state.params)))}
    copied = [name for name in re.findall(r"copy\(%([^)\s,]+)\)", entry) if name in params]
    assert copied == []
    _, metrics = run.step_fn(run.state, batch)
    assert int(metrics["divergence/reason"]) == 5 and bool(metrics["divergence/halt"])
