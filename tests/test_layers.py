"""Shared layers: values against numpy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.models import layers
from tenure.models.layers import (Dense, LayerNorm, MultiHeadAttention, RMSNorm, SwiGLU, attention_mask,
                                  dot_product_attention, library_attention, remat_module)
from tenure.models.lora import LoRASpec


def _init(module, *args, **kwargs):
    return nn.unbox(module.init(jax.random.key(0), *args, **kwargs))["params"]


class _Proj(nn.Module):
    spec: LoRASpec

    @nn.compact
    def __call__(self, x):
        return Dense(5, lora=self.spec, name="proj")(x) + Dense(5, lora=self.spec, name="other")(x)


def test_dense_kernel_layout_and_lora_delta():
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    spec = LoRASpec(rank=2, alpha=4.0, targets=("proj",))
    params = _init(_Proj(spec), x)
    assert params["proj"]["kernel"].shape == (4, 5) and params["proj"]["lora_a"].shape == (4, 2)
    np.testing.assert_array_equal(params["proj"]["lora_b"], np.zeros((2, 5)))
    assert "lora_a" not in params["other"]  # not a target: no adapter
    params["proj"]["lora_b"] = jnp.ones((2, 5))
    out = _Proj(spec).apply({"params": params}, x)
    p, o = params["proj"], params["other"]
    expected = (x @ p["kernel"] + p["bias"] + (x @ p["lora_a"] @ p["lora_b"]) * 2.0
                + x @ o["kernel"] + o["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_mask_segments_and_causal():
    seg = np.array([[1, 1, 2, 0]])
    mask = np.asarray(attention_mask(seg))[0, 0]
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    causal = np.asarray(attention_mask(seg, causal=True))[0, 0]
    np.testing.assert_array_equal(causal, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_gqa_attention_matches_numpy_and_padded_rows_are_finite():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    k = rng.normal(size=(2, 4, 2, 3)).astype(np.float32)
    v = rng.normal(size=(2, 4, 2, 3)).astype(np.float32)
    mask = np.asarray(attention_mask(np.array([[1, 1, 1, 0], [1, 1, 1, 1]]), causal=True))
    out = np.asarray(dot_product_attention(q, k, v, mask))
    k_rep, v_rep = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k_rep) / np.sqrt(3.0)
    scores = np.where(mask, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    expected = np.einsum("bhls,bshd->blhd", probs, v_rep)
    np.testing.assert_allclose(out[0, :3], expected[0, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], expected[1], rtol=1e-5, atol=1e-6)
    assert np.isfinite(out).all()  # row 0 position 3 attends nowhere


def test_packed_row_equals_separate_rows():
    rng = np.random.default_rng(2)
    mha = MultiHeadAttention(num_heads=4, head_dim=2, num_kv_heads=2)
    x = rng.normal(size=(1, 5, 8)).astype(np.float32)
    params = _init(mha, x, attention_mask(np.ones((1, 5), np.int32)))
    packed = mha.apply({"params": params}, x, attention_mask(np.array([[1, 1, 1, 2, 2]])))
    first = mha.apply({"params": params}, x[:, :3], attention_mask(np.ones((1, 3), np.int32)))
    second = mha.apply({"params": params}, x[:, 3:], attention_mask(np.ones((1, 2), np.int32)))
    np.testing.assert_allclose(packed, np.concatenate([first, second], axis=1), atol=1e-6)


def test_attention_dropout_uses_rng_only_when_training():
    mha = MultiHeadAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
    x = np.random.default_rng(3).normal(size=(1, 6, 8)).astype(np.float32)
    mask = attention_mask(np.ones((1, 6), np.int32))
    params = _init(mha, x, mask)
    eval_a = mha.apply({"params": params}, x, mask)
    train_a = mha.apply({"params": params}, x, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train_b = mha.apply({"params": params}, x, mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(eval_a, train_a) and not np.allclose(train_a, train_b)


# BERT padding (one row half padding: its pad queries attend nowhere), GPT-2 causal + packed
# segments with a pad tail, and grouped-query heads (4 query heads over 2 KV heads) on the same.
ATTENTION_CASES = {
    "bert_padding": (np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]), False, 4),
    "gpt2_causal_packed": (np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]), True, 4),
    "llama_gqa_packed": (np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]]), True, 2),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_xla_attention_equals_einsum_outputs_and_gradients(case, dtype, tol):
    segments, causal, num_kv = ATTENTION_CASES[case]
    rng = np.random.default_rng(6)
    q = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 6, num_kv, 8)).astype(np.float32) for _ in range(2))
    mask = attention_mask(segments, causal=causal)

    def loss(fn, q, k, v):  # weights every output, padding rows too
        out = fn(q, k, v, mask, dtype=dtype).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))), out

    (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss(dot_product_attention, *a), (0, 1, 2), has_aux=True)(q, k, v)
    (_, out), grads = jax.value_and_grad(lambda *a: loss(library_attention, *a), (0, 1, 2), has_aux=True)(q, k, v)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)  # pad rows included: uniform in both
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, rtol=tol, atol=tol * float(np.abs(g_ref).max()))


def test_attention_switch_uses_the_library_only_without_attention_dropout(monkeypatch):
    calls = []
    spy = lambda *a, **kw: calls.append(kw["implementation"]) or library_attention(*a, **kw)
    monkeypatch.setattr(layers, "library_attention", spy)
    x = np.random.default_rng(7).normal(size=(2, 5, 8)).astype(np.float32)
    mask = attention_mask(np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    einsum, xla = (MultiHeadAttention(num_heads=4, head_dim=2, num_kv_heads=2, dropout_rate=0.5, attention=a)
                   for a in ("einsum", "xla"))
    params = _init(einsum, x, mask)
    np.testing.assert_allclose(xla.apply({"params": params}, x, mask), einsum.apply({"params": params}, x, mask),
                               rtol=1e-5, atol=1e-6)
    assert calls == ["xla"]
    train = lambda m: m.apply({"params": params}, x, mask, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(train(xla), train(einsum))  # dropout: the einsum path, same rng
    assert calls == ["xla"]
    no_dropout = MultiHeadAttention(num_heads=4, head_dim=2, num_kv_heads=2, dropout_rate=0.0, attention="xla")
    no_dropout.apply({"params": params}, x, mask, deterministic=False)
    assert calls == ["xla", "xla"]


def test_norms_match_numpy():
    x = np.random.default_rng(4).normal(3.0, 2.0, size=(2, 7)).astype(np.float32)
    ln = np.asarray(LayerNorm(eps=1e-5).apply({"params": {"scale": np.full(7, 2.0), "bias": np.ones(7)}}, x))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * 2.0 + 1.0
    np.testing.assert_allclose(ln, ref, rtol=1e-5, atol=1e-5)
    rms = np.asarray(RMSNorm(eps=1e-6).apply({"params": {"scale": np.full(7, 0.5)}}, x))
    np.testing.assert_allclose(rms, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * 0.5, rtol=1e-5)


def test_remat_gives_the_same_gradients():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic):
            return SwiGLU(16)(x, deterministic)

    x = np.random.default_rng(5).normal(size=(2, 3, 8)).astype(np.float32)
    params = _init(Block(), x, True)

    def grads(cls):
        loss = lambda p: jnp.sum(cls().apply({"params": p}, x, True) ** 2)
        return jax.grad(loss)(params)

    plain, full, dots = grads(Block), grads(remat_module(Block, "full", (2,))), grads(remat_module(Block, "dots", (2,)))
    # Recomputing the forward can fuse, so round, differently: an ulp on an element much smaller
    # than its neighbours (seen on AMD Zen 3) is rounding; a wrong gradient is off by far more.
    for a, b, c in zip(jax.tree.leaves(plain), jax.tree.leaves(full), jax.tree.leaves(dots)):
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6 * scale)


def test_erf_gelu_gradient_equals_the_closed_form_in_fp32_and_bf16():
    """The exact GELU's custom VJP (it keeps x, not XLA's fp32 erf, for the backward) gives
    d/dx x Phi(x) = Phi(x) + x phi(x), checked against float64 numpy; values unchanged."""
    import math
    x_np = np.linspace(-6.0, 6.0, 241)
    gelu = layers.ACTIVATIONS["gelu"]
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        x = jnp.asarray(x_np, dtype)
        value, grad = gelu(x), jax.grad(lambda v: gelu(v).astype(jnp.float32).sum())(x)
        assert grad.dtype == dtype
        x_rounded = np.asarray(x, np.float64)  # bf16 rounds the inputs: compare at those
        phi_r = 0.5 + 0.5 * np.vectorize(math.erf)(x_rounded / math.sqrt(2))
        np.testing.assert_allclose(np.asarray(value, np.float64), x_rounded * phi_r, atol=tol * 6, rtol=tol)
        np.testing.assert_allclose(np.asarray(grad, np.float64),
                                   phi_r + x_rounded * np.exp(-0.5 * x_rounded ** 2) / math.sqrt(2 * math.pi),
                                   atol=tol, rtol=tol)
