"""The divergence guard: NaN/Inf and spikes of loss and gradient norm, decided inside jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest

from engine.guard import GuardConfig, describe, guard_step, init_guard_state, keep_if_ok


def run(cfg, pairs):
    """Feeds (loss, grad_norm) pairs through a jitted guard; returns oks and the states."""
    step = jax.jit(lambda s, l, g: guard_step(cfg, s, l, g))
    state, oks, states = init_guard_state(), [], []
    for loss, grad_norm in pairs:
        ok, state = step(state, jnp.float32(loss), jnp.float32(grad_norm))
        oks.append(bool(ok))
        states.append(jax.device_get(state))
    return oks, states


def test_non_finite_loss_or_grad_norm_halts_by_default():
    cfg = GuardConfig()
    oks, states = run(cfg, [(2.0, 1.0), (np.nan, 1.0)])
    assert oks == [True, False] and bool(states[1].halt) and int(states[1].reason) == 1
    oks, states = run(cfg, [(2.0, 1.0), (2.0, np.inf)])
    assert oks == [True, False] and bool(states[1].halt) and int(states[1].reason) == 2
    assert describe(states[1], 2, 2.0, float("inf")) == "step 2: non-finite gradient norm (loss 2, gradient norm inf)"


def test_spikes_after_warmup_and_the_mean_ignores_bad_steps():
    cfg = GuardConfig(warmup_steps=3, spike_factor=10)
    pairs = [(2.0, 1.0)] * 3 + [(25.0, 1.0)]
    oks, states = run(cfg, pairs)
    assert oks == [True, True, True, False]
    assert int(states[-1].reason) == 3 and float(states[-1].loss_ema) == pytest.approx(2.0)
    assert describe(states[-1], 4, 25.0, 1.0) == "step 4: loss spike (loss 25, gradient norm 1, running mean 2)"
    # Before warmup the same jump is allowed (the means are still settling).
    oks, _ = run(cfg, [(2.0, 1.0), (25.0, 1.0)])
    assert oks == [True, True]
    # A finite loss with an exploding gradient norm (weights blowing up) is a spike too.
    oks, states = run(cfg, [(2.0, 1.0)] * 3 + [(2.5, 1e6)])
    assert oks[-1] is False and int(states[-1].reason) == 4


def test_loss_floor_keeps_noise_near_zero_loss_from_halting():
    cfg = GuardConfig(warmup_steps=2)
    oks, _ = run(cfg, [(0.01, 1.0), (0.01, 1.0), (0.5, 1.0)])  # 50x the mean, but below 10 x 0.1
    assert oks == [True, True, True]


def test_skip_policy_counts_and_halts_after_max_skips_in_a_row():
    cfg = GuardConfig(policy="skip", max_skips=2)
    oks, states = run(cfg, [(1.0, 1.0), (np.nan, 1.0), (1.0, 1.0), (np.nan, 1.0), (np.nan, 1.0),
                            (np.nan, 1.0)])
    assert oks == [True, False, True, False, False, False]
    assert [int(s.skipped) for s in states] == [0, 1, 1, 2, 3, 3]
    assert [bool(s.halt) for s in states] == [False] * 5 + [True]
    assert describe(states[-1], 6, float("nan"), 1.0) == (
        "step 6: non-finite loss (loss nan, gradient norm 1); 3 bad steps in a row, 3 skipped in all")


def test_keep_if_ok_selects_on_device():
    new, old = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
    pick = jax.jit(keep_if_ok)
    np.testing.assert_array_equal(pick(jnp.bool_(True), new, old)["w"], np.ones(3))
    np.testing.assert_array_equal(pick(jnp.bool_(False), new, old)["w"], np.zeros(3))


def test_guard_has_no_host_sync():
    cfg = GuardConfig()
    # Traceable with abstract values only: no concrete value is ever needed on the host.
    shapes = jax.eval_shape(lambda s, l, g: guard_step(cfg, s, l, g), init_guard_state(),
                            jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    assert shapes[0].dtype == jnp.bool_


def test_config_refuses_bad_values():
    with pytest.raises(pydantic.ValidationError):
        GuardConfig(policy="ignore")
    with pytest.raises(pydantic.ValidationError):
        GuardConfig(max_skips=True)
    with pytest.raises(pydantic.ValidationError):
        GuardConfig(spike_factor=float("inf"))
    assert GuardConfig(spike_factor=None, grad_spike_factor=None).policy == "halt"
