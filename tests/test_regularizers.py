"""EWC and L2-SP loss terms (engine/continual/regularizers.py): values against numpy on hand-built pruned
trees, gradients in closed form, fp32 for bf16 params, exact zero at lam = alpha = 0."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.engine.tasks.losses import classification_ce, total_loss
from tenure.engine.continual.regularizers import ewc_extra, ewc_term, l2sp_extra, l2sp_term
from tenure.engine.runtime.sharding import MeshConfig, make_mesh
from jax.sharding import NamedSharding, PartitionSpec as P

RNG = np.random.default_rng(0)


def _arr(*shape):
    return RNG.normal(size=shape).astype(np.float32)


PARAMS = {"backbone": {"layer": {"kernel": _arr(3, 4), "bias": _arr(4)}, "emb": {"table": _arr(5, 2)}},
          "head": {"kernel": _arr(4, 2)}}
# pruned: the embedding table and the head are not penalised
FISHER = {"backbone": {"layer": {"kernel": np.abs(_arr(3, 4)), "bias": np.abs(_arr(4))}}}
ANCHOR = {"backbone": {"layer": {"kernel": _arr(3, 4), "bias": _arr(4)}}}


def _np_ewc(params):
    total = 0.0
    for name in ("kernel", "bias"):
        theta = np.asarray(params["backbone"]["layer"][name], np.float64)
        total += np.sum(FISHER["backbone"]["layer"][name] * (theta - ANCHOR["backbone"]["layer"][name]) ** 2)
    return total


def _extra(**kw):
    return {"ewc": {"fisher": jax.tree.map(jnp.asarray, FISHER), "anchor": jax.tree.map(jnp.asarray, ANCHOR)},
            "l2sp": {"anchor": jax.tree.map(jnp.asarray, ANCHOR)}, **kw}


def test_ewc_value_and_aux_match_numpy():
    value, aux = ewc_term(0.7)(PARAMS, {}, {}, _extra())
    want = _np_ewc(PARAMS)
    np.testing.assert_allclose(float(aux["penalty"]), want, rtol=1e-6)
    np.testing.assert_allclose(float(value), 0.35 * want, rtol=1e-6)
    assert value.dtype == jnp.float32 and set(aux) == {"penalty"}


def test_ewc_gradient_is_lam_f_times_displacement():
    lam = 3.0
    grads = jax.grad(lambda p: ewc_term(lam)(p, {}, {}, _extra())[0])(PARAMS)
    for name in ("kernel", "bias"):
        f, a = FISHER["backbone"]["layer"][name], ANCHOR["backbone"]["layer"][name]
        want = lam * f * (PARAMS["backbone"]["layer"][name] - a)
        np.testing.assert_allclose(np.asarray(grads["backbone"]["layer"][name]), want, rtol=1e-5, atol=1e-7)
    # leaves outside the Fisher get no pull
    assert not np.any(np.asarray(grads["head"]["kernel"])) and not np.any(np.asarray(grads["backbone"]["emb"]["table"]))


def test_l2sp_value_and_gradient():
    alpha = 0.2
    fn = lambda p: l2sp_term(alpha)(p, {}, {}, _extra())
    (value, aux), grads = jax.value_and_grad(fn, has_aux=True)(PARAMS)
    diff = {n: PARAMS["backbone"]["layer"][n].astype(np.float64) - ANCHOR["backbone"]["layer"][n]
            for n in ("kernel", "bias")}
    dist = sum(np.sum(d ** 2) for d in diff.values())
    np.testing.assert_allclose(float(aux["distance_sq"]), dist, rtol=1e-6)
    np.testing.assert_allclose(float(value), alpha / 2 * dist, rtol=1e-6)
    for n, d in diff.items():
        np.testing.assert_allclose(np.asarray(grads["backbone"]["layer"][n]), alpha * d, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(grads["head"]["kernel"]))


@pytest.mark.parametrize("make", [ewc_term, l2sp_term])
def test_zero_strength_is_exactly_zero_and_leaves_the_task_loss_bitwise(make):
    fn = lambda p: make(0.0)(p, {}, {}, _extra())[0]
    value, grads = jax.value_and_grad(fn)(PARAMS)
    assert float(value) == 0.0
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    # task + term(0) == task alone, value and gradient bit for bit
    logits = jnp.asarray(_arr(6, 2))
    batch = {"labels": jnp.array([0, 1, 1, 0, 1, 0]), "example_mask": jnp.array([1, 1, 1, 1, 1, 0.0])}

    def loss(p, terms):
        outputs = {"logits": logits @ p["head"]["kernel"].T @ p["head"]["kernel"]}
        return total_loss(terms, p, outputs, batch, _extra())[0]

    plain = jax.value_and_grad(loss)(PARAMS, {"task": classification_ce})
    with_term = jax.value_and_grad(loss)(PARAMS, {"task": classification_ce, "reg": make(0.0)})
    assert float(plain[0]) == float(with_term[0])
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(with_term[1])):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bf16_params_are_penalised_in_fp32():
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), PARAMS)
    value, aux = jax.jit(lambda p, e: ewc_term(1.0)(p, {}, {}, e))(p16, _extra())
    assert value.dtype == jnp.float32 and aux["penalty"].dtype == jnp.float32
    # numpy on the bf16-rounded values, in float64: fp32 accuracy, not bf16's 3 digits
    want = _np_ewc(jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), p16))
    np.testing.assert_allclose(float(aux["penalty"]), want, rtol=1e-6)
    dist = l2sp_term(1.0)(p16, {}, {}, _extra())[1]["distance_sq"]
    assert dist.dtype == jnp.float32
    _, grads = jax.value_and_grad(lambda p: ewc_term(1.0)(p, {}, {}, _extra())[0])(p16)
    assert grads["backbone"]["layer"]["kernel"].dtype == jnp.bfloat16   # gradients keep the param dtype


def test_extras_are_fp32_copies_keeping_shardings_and_terms_need_them():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = NamedSharding(mesh, P("fsdp", "tensor"))
    params = {"backbone": {"layer": {"kernel": jax.device_put(jnp.asarray(_arr(4, 4), jnp.bfloat16), sharded)}},
              "head": {"kernel": jnp.asarray(_arr(4, 2))}}
    mask = {"backbone": {"layer": {"kernel": True}}, "head": {"kernel": False}}
    l2sp = l2sp_extra(params, mask)
    anchor = l2sp["anchor"]["backbone"]["layer"]["kernel"]
    assert "head" not in l2sp["anchor"]
    assert anchor.dtype == jnp.float32 and anchor.sharding.spec == P("fsdp", "tensor")
    fisher = {"head": {"kernel": jnp.ones((4, 2))}}
    ewc = ewc_extra(fisher, params)
    head_anchor = ewc["anchor"]["head"]["kernel"]
    assert ewc["fisher"] is fisher and "backbone" not in ewc["anchor"]
    # a copy, not an alias: the train step donates the params
    assert head_anchor.unsafe_buffer_pointer() != params["head"]["kernel"].unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(head_anchor), np.asarray(params["head"]["kernel"]))
    value, aux = ewc_term(1.0)(params, {}, {}, {"ewc": ewc})
    assert float(value) == 0.0 and float(aux["penalty"]) == 0.0     # at the anchor
    with pytest.raises(ValueError, match=r"extra\['ewc'\]"):
        ewc_term(1.0)(params, {}, {}, {})
    with pytest.raises(ValueError, match=r"extra\['l2sp'\]"):
        l2sp_term(1.0)(params, {}, {}, {"ewc": ewc})
    with pytest.raises(KeyError, match="head/missing"):
        ewc_term(1.0)(params, {}, {}, {"ewc": {"fisher": {"head": {"missing": jnp.ones(1)}},
                                               "anchor": {"head": {"missing": jnp.ones(1)}}}})


def test_l2sp_under_lora_penalises_the_merged_weight_change():
    """An adapted layer's distance is ||scale (A B - A0 B0) + delta kernel||^2 (the merged weight the
    model computes with), against numpy; other anchored leaves count as usual. The adapter
    factors' own distance is a different number (B A and (B c)(A / c) merge to the same weight)."""
    scale = 2.0
    a0, b0, a, b = _arr(4, 2), _arr(2, 3), _arr(4, 2), _arr(2, 3)
    bias, bias0 = _arr(3), _arr(3)
    params = {"backbone": {"q": {"kernel": _arr(4, 3), "lora_a": a, "lora_b": b, "bias": bias}}}
    anchor = {"backbone": {"q": {"lora_a": a0, "lora_b": b0, "bias": bias0}}}   # frozen kernel
    extra = {"l2sp": {"anchor": jax.tree.map(jnp.asarray, anchor)}}
    value, aux = l2sp_term(0.5, lora_scale=scale)(params, {}, {}, extra)
    f64 = lambda x: np.asarray(x, np.float64)
    merged = scale * (f64(a) @ f64(b) - f64(a0) @ f64(b0))
    want = np.sum(merged ** 2) + np.sum((f64(bias) - f64(bias0)) ** 2)
    np.testing.assert_allclose(float(aux["distance_sq"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(value), 0.25 * want, rtol=1e-5)
    # the same merged weight through rescaled factors: the same penalty (the factors' one differs)
    c = 3.0
    rescaled = {"backbone": {"q": dict(params["backbone"]["q"], lora_a=a * c, lora_b=b / c)}}
    np.testing.assert_allclose(float(l2sp_term(0.5, lora_scale=scale)(rescaled, {}, {}, extra)[1]["distance_sq"]),
                               want, rtol=1e-5)
    factors = float(l2sp_term(0.5)(rescaled, {}, {}, extra)[1]["distance_sq"])
    assert abs(factors - want) > 0.1 * want
    # a trainable kernel too: its change adds to the adapters' inside the one merged delta
    kernel0 = _arr(4, 3)
    both = {"l2sp": {"anchor": {"backbone": {"q": dict(anchor["backbone"]["q"], kernel=kernel0)}}}}
    got = float(l2sp_term(0.5, lora_scale=scale)(params, {}, {}, both)[1]["distance_sq"])
    delta = merged + f64(params["backbone"]["q"]["kernel"]) - f64(kernel0)
    np.testing.assert_allclose(got, np.sum(delta ** 2) + np.sum((f64(bias) - f64(bias0)) ** 2), rtol=1e-5)
