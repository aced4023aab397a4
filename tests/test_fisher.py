"""Diagonal Fisher (engine/continual/fisher.py): closed forms for softmax and linear regression, the token
path against hand-written per-example loops on the real tiny GPT-2 / BERT fixtures, the
unbiasedness of the per-sequence sampled token Fisher, padding, trimming, chunking, and 8
simulated devices against 1.

Relative error of a Fisher, as used below: mean over entries of |F - F_ref| / F_ref."""
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.engine.continual.fisher import (FISHER_MODES, fisher_diagonal, make_fisher_step, online_update, overlay,
                                            pick, prune)
from tenure.engine.runtime.sharding import MeshConfig, make_mesh, param_shardings, put_params, replicated
from tenure.engine.train.step import like_params_shardings
from tenure.models.bert import BertConfig
from tenure.models.errors import TenureError
from tenure.models.hf import load_hf
from tenure.models.tasks import build_task_model, graft_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
N, D, C = 64, 5, 4


class Linear(nn.Module):
    """logits = x @ W (no bias): softmax regression; `regression=True` gives predictions = x @ w."""
    classes: int = C
    regression: bool = False

    @nn.compact
    def __call__(self, batch, deterministic=True):
        out = nn.Dense(1 if self.regression else self.classes, use_bias=False)(batch["x"])
        return {"predictions": out[:, 0], "logits": out} if self.regression else {"logits": out}


def one_device():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


def replicated_like(params, mesh):
    return jax.tree.map(lambda _: replicated(mesh), params)


def all_true(params):
    return jax.tree.map(lambda _: True, params)


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.mean(np.abs(got - want) / np.abs(want)))


def softmax_problem(seed=0, n=N, labels=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    W = (1.5 * rng.normal(size=(D, C))).astype(np.float32)
    z = x.astype(np.float64) @ W
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if labels == "model":   # labels drawn from the model: W is at the population optimum
        y = np.array([rng.choice(C, p=row) for row in p], np.int32)
    else:
        y = rng.integers(0, C, n).astype(np.int32)
    return x, y, p, {"Dense_0": {"kernel": jnp.asarray(W)}}


def batches_of(x, y, size):
    return [{"x": x[i:i + size], "labels": y[i:i + size], "example_mask": np.ones(len(x[i:i + size]), np.float32)}
            for i in range(0, len(x), size)]


@functools.cache
def softmax_step(mode, chunk=8, regression=False):
    mesh = one_device()
    model = Linear(regression=regression)
    params = {"Dense_0": {"kernel": jnp.zeros((D, 1 if regression else C))}}
    return make_fisher_step(model, "regression" if regression else "seq_cls", mode, all_true(params), mesh,
                            replicated_like(params, mesh), chunk=chunk)


def kernel(F):
    return np.asarray(F["Dense_0"]["kernel"])


# ----------------------------------------------------------------------------- closed forms

def test_softmax_exact_empirical_batched_closed_form():
    x, y, p, params = softmax_problem()
    batches = batches_of(x, y, 16)
    x2 = x.astype(np.float64) ** 2
    onehot = np.eye(C)[y]
    # d log p_c / d W_jk = (delta_ck - p_k) x_j  (kernel[j, k] = W_kj)
    exact = np.einsum("nk,nj->jk", p * (1 - p), x2) / N
    empirical = np.einsum("nk,nj->jk", (onehot - p) ** 2, x2) / N
    grads = np.einsum("nk,nj->njk", onehot - p, x)
    batched = sum(len(g) * g.mean(0) ** 2 for g in np.split(grads, N // 16)) / N

    for mode, want in (("exact", exact), ("empirical", empirical), ("batched", batched)):
        F, count = fisher_diagonal(softmax_step(mode), params, batches, jax.random.key(0))
        assert count == N
        assert F["Dense_0"]["kernel"].dtype == jnp.float32
        assert rel(kernel(F), want) < 1e-6, mode
        np.testing.assert_allclose(kernel(F), want, rtol=1e-5)
    # the wrong estimator is far from the right ones on the same data
    assert rel(batched, empirical) > 0.5


def test_sampled_converges_to_exact():
    x, y, p, params = softmax_problem(seed=1, n=256)
    reps = 16   # 4096 draws: 16 per input
    batches = batches_of(np.tile(x, (reps, 1)), np.tile(y, reps), 512)
    exact = np.einsum("nk,nj->jk", p * (1 - p), x.astype(np.float64) ** 2) / len(x)
    F, count = fisher_diagonal(softmax_step("sampled"), params, batches, jax.random.key(3))
    assert count == reps * len(x)
    err = rel(kernel(F), exact)
    F_emp, _ = fisher_diagonal(softmax_step("empirical"), params, batches, jax.random.key(3))
    print(f"sampled vs exact: {err:.4f}; empirical vs exact: {rel(kernel(F_emp), exact):.4f}")
    assert err < 0.05
    assert rel(kernel(F_emp), exact) > 4 * 0.05  # the tolerance does tell the estimators apart
    # another key gives other draws: the labels really are sampled
    F2, _ = fisher_diagonal(softmax_step("sampled"), params, batches, jax.random.key(4))
    assert not np.allclose(kernel(F2), kernel(F)) and rel(kernel(F2), exact) < 0.05


def test_batched_is_empirical_over_batch_size_at_optimum():
    """At an optimum E[g] = 0, so E[gbar^2] = F / B: BATCHED is the empirical Fisher shrunk by 1/B."""
    n, b = 4096, 16
    x, y, _, params = softmax_problem(seed=2, n=n, labels="model")
    batches = batches_of(x, y, b)
    F_emp, _ = fisher_diagonal(softmax_step("empirical"), params, batches, jax.random.key(0))
    F_bat, _ = fisher_diagonal(softmax_step("batched"), params, batches, jax.random.key(0))
    ratio = float(np.mean(kernel(F_bat) * b / kernel(F_emp)))
    print(f"batched * B / empirical = {ratio:.3f} (B = {b})")
    assert 0.8 < ratio < 1.25
    assert np.all(kernel(F_bat) < kernel(F_emp) / 4)


def test_regression_gaussian_closed_form():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(512, D)).astype(np.float32)
    w = rng.normal(size=(D, 1)).astype(np.float32)
    y = (x @ w)[:, 0] + rng.normal(size=512).astype(np.float32)
    params = {"Dense_0": {"kernel": jnp.asarray(w)}}
    batches = batches_of(np.tile(x, (8, 1)), np.tile(y, 8), 512)
    x2 = x.astype(np.float64) ** 2
    exact = x2.mean(0)[:, None]                               # E_y[(y - f)^2] = 1
    resid = y - (x.astype(np.float64) @ w)[:, 0]
    empirical = (resid[:, None] ** 2 * x2).mean(0)[:, None]
    got = {m: fisher_diagonal(softmax_step(m, regression=True), params, batches, jax.random.key(1))[0]
           for m in ("exact", "empirical", "sampled")}
    assert rel(kernel(got["exact"]), exact) < 1e-6
    assert rel(kernel(got["empirical"]), empirical) < 1e-6
    assert rel(kernel(got["sampled"]), exact) < 0.05    # 4096 draws of N(0, 1) residuals
    assert rel(kernel(got["sampled"]), kernel(got["exact"])) > 0  # really sampled


# ----------------------------------------------------------------------------- batches

def test_padding_rows_change_nothing():
    x, y, _, params = softmax_problem(seed=6, n=32)
    clean = batches_of(x, y, 16)
    padded = []
    for b in clean:   # 4 padding rows interleaved, holding garbage (NaN inputs, -100 labels)
        xs = np.insert(b["x"], [0, 5, 5, 16], np.nan, axis=0)
        ys = np.insert(b["labels"], [0, 5, 5, 16], -100)
        em = np.insert(b["example_mask"], [0, 5, 5, 16], 0.0)
        padded.append({"x": xs.astype(np.float32), "labels": ys.astype(np.int32), "example_mask": em})
    for mode in ("exact", "empirical", "batched"):
        F, n = fisher_diagonal(softmax_step(mode), params, clean, jax.random.key(0))
        Fp, n_p = fisher_diagonal(softmax_step(mode), params, padded, jax.random.key(0))
        assert n == n_p == 32
        assert np.all(np.isfinite(kernel(Fp)))
        np.testing.assert_allclose(kernel(Fp), kernel(F), rtol=1e-6, err_msg=mode)


def test_max_examples_trims_the_crossing_batch_and_stops():
    x, y, p, params = softmax_problem(seed=7, n=64)
    batches = batches_of(x, y, 16)
    batches[1]["example_mask"][[0, 2]] = 0.0   # the crossing batch has padding before the cut
    pulled = []

    def stream():
        for i, b in enumerate(batches):
            pulled.append(i)
            yield b

    F, count = fisher_diagonal(softmax_step("exact"), params, stream(), jax.random.key(0), max_examples=20)
    assert count == 20 and pulled == [0, 1]
    used = np.r_[np.arange(16), 16 + np.array([1, 3, 4, 5])]   # the first 20 real rows
    want = np.einsum("nk,nj->jk", (p * (1 - p))[used], x[used].astype(np.float64) ** 2) / 20
    assert rel(kernel(F), want) < 1e-6
    _, all_count = fisher_diagonal(softmax_step("exact"), params, batches, jax.random.key(0), max_examples=1000)
    assert all_count == 62
    with pytest.raises(TenureError, match="no real example"):
        empty = [dict(batches[0], example_mask=np.zeros(16, np.float32))]
        fisher_diagonal(softmax_step("exact"), params, empty, jax.random.key(0))


def test_chunking_gives_the_same_fisher():
    x, y, _, params = softmax_problem(seed=8, n=24)
    batches = batches_of(x, y, 12)   # 12 rows: passes of 1, 4 (chunk 5), 6 (chunk 8), 12 (chunk 16)
    for mode, chunks in (("sampled", (5, 8, 16)), ("exact", (5,))):
        ref, _ = fisher_diagonal(softmax_step(mode, chunk=1), params, batches, jax.random.key(2))
        for chunk in chunks:
            got, _ = fisher_diagonal(softmax_step(mode, chunk=chunk), params, batches, jax.random.key(2))
            np.testing.assert_allclose(kernel(got), kernel(ref), rtol=1e-6, err_msg=f"{mode} chunk={chunk}")


# ----------------------------------------------------------------------------- token kinds

class TokenLinear(nn.Module):
    """Per-position logits that share W and mix in the sequence mean, so different positions'
    gradients are correlated (the cross terms of the squared sum are not zero)."""

    @nn.compact
    def __call__(self, batch, deterministic=True):
        x = batch["x"]                                     # [B, L, D]
        return {"logits": nn.Dense(3, use_bias=False)(x + x.mean(1, keepdims=True))}


def test_sampled_token_fisher_is_the_mean_of_the_per_token_fisher():
    """E_y[(sum_t g_t(y_t))^2] = sum_t sum_c p_tc g_tc^2, divided by the labelled tokens: the mean
    over labelled tokens of the per-token Fisher F_t = sum_c p_tc g_tc^2, computed here from the
    per-(token, class) gradients; the empirical squared sum (cross terms kept) is measurably
    different. The same sequences twice as long (each repeated) give the same F: it does not
    grow with the labelled tokens per sequence (the per-example form doubled)."""
    rng = np.random.default_rng(9)
    n, length = 16, 3
    x = rng.normal(size=(n, length, D)).astype(np.float32)
    labels = rng.integers(0, 3, (n, length)).astype(np.int32)
    labels[::2, 1] = -100
    model = TokenLinear()
    params = nn.unbox(model.init(jax.random.key(0), {"x": x[:1]})["params"])
    params = {"Dense_0": {"kernel": params["Dense_0"]["kernel"] * 4.0}}

    def logp(k, xn):   # [L, 3] log-probs of one example
        return jax.nn.log_softmax(model.apply({"params": {"Dense_0": {"kernel": k}}}, {"x": xn[None]})["logits"][0])

    k0 = params["Dense_0"]["kernel"]
    jac = np.asarray(jax.vmap(jax.jacrev(logp), in_axes=(None, 0))(k0, x))          # [n, L, 3, D, 3]
    prob = np.exp(np.asarray(jax.vmap(logp, in_axes=(None, 0))(k0, x)))              # [n, L, 3]
    valid = labels != -100
    per_token_Fisher = np.einsum("nlc,nlcjk->nljk", prob, jac.astype(np.float64) ** 2)   # F_t, every position
    factorised = per_token_Fisher[valid].mean(0)                    # mean over the labelled tokens
    assert valid.sum() == 40                                        # 16 x 3 positions, 8 unlabelled
    per_example = np.take_along_axis(jac, np.maximum(labels, 0)[:, :, None, None, None], 2)[:, :, 0]
    empirical = ((per_example * valid[..., None, None]).sum(1).astype(np.float64) ** 2).sum(0) / valid.sum()

    mesh = one_device()
    make = lambda mode: make_fisher_step(model, "token_cls", mode, all_true(params), mesh,
                                         replicated_like(params, mesh), chunk=64)
    reps = 256
    batches = [{"x": np.tile(x, (reps, 1, 1)), "labels": np.tile(labels, (reps, 1)),
                "example_mask": np.ones(n * reps, np.float32)}]
    F_emp, _ = fisher_diagonal(make("empirical"), params, batches[:1], jax.random.key(0))
    assert rel(kernel(F_emp), empirical) < 1e-5
    F_s, count = fisher_diagonal(make("sampled"), params, batches, jax.random.key(1))
    assert count == n * reps
    print(f"sampled vs factorised: {rel(kernel(F_s), factorised):.4f}; "
          f"empirical vs factorised: {rel(empirical, factorised):.4f}")
    assert rel(kernel(F_s), factorised) < 0.05
    assert rel(empirical, factorised) > 0.2
    # each sequence twice (x x, labels labels): x's mean is unchanged, so every position's F_t is
    longer = [{"x": np.tile(np.concatenate([x, x], 1), (reps, 1, 1)),
               "labels": np.tile(np.concatenate([labels, labels], 1), (reps, 1)),
               "example_mask": np.ones(n * reps, np.float32)}]
    F_long, _ = fisher_diagonal(make("sampled"), params, longer, jax.random.key(2))
    ratio = float(kernel(F_long).sum() / kernel(F_s).sum())
    print(f"F(2L) / F(L) = {ratio:.3f}")
    assert rel(kernel(F_long), factorised) < 0.05 and 0.93 < ratio < 1.07


def _tiny_real(family_dir, kind):
    arch, backbone, head, _ = load_hf(FIXTURES / family_dir, with_tokenizer=False)
    ref = np.load(FIXTURES / family_dir / "reference.npz")
    batch = {"input_ids": ref["input_ids"].astype(np.int32), "attention_mask": ref["attention_mask"].astype(np.int32)}
    model = build_task_model(arch, kind, num_labels=5)
    params = graft_pretrained(nn.unbox(model.init(jax.random.key(0), batch)["params"]), backbone,
                              head if kind == "causal_lm" else None)
    return model, params, batch


def _hand_loop(model, params, mask, batch, kind):
    """sum over real examples of (grad of the example's summed labelled-token log p)^2, one
    example at a time, in a plain Python loop."""
    trainable = prune(params, mask)

    @jax.jit
    def grad_one(t, ids, attn, labels):
        def ll(t):
            logits = model.apply({"params": overlay(params, t)},
                                 {"input_ids": ids[None], "attention_mask": attn[None]}, deterministic=True)["logits"][0]
            lab = labels
            if kind == "causal_lm":
                logits, lab = logits[:-1], labels[1:]
            logp = jax.nn.log_softmax(logits)
            tok = jnp.take_along_axis(logp, jnp.maximum(lab, 0)[:, None], -1)[:, 0]
            return jnp.sum(jnp.where(lab != -100, tok, 0.0))
        return jax.grad(ll)(t)

    total = jax.tree.map(lambda t: np.zeros(t.shape, np.float64), trainable)
    for i in range(len(batch["input_ids"])):
        if batch["example_mask"][i] == 0:
            continue
        g = grad_one(trainable, batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i])
        total = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64) ** 2, total, g)
    return total


@pytest.mark.parametrize("family_dir,kind", [
    ("gpt2", "causal_lm"), pytest.param("bert/token_cls", "token_cls", marks=pytest.mark.slow)])
def test_empirical_token_fisher_matches_hand_loop(family_dir, kind):
    model, params, batch = _tiny_real(family_dir, kind)
    rng = np.random.default_rng(10)
    b, length = batch["input_ids"].shape
    high = 5 if kind == "token_cls" else 300
    labels = rng.integers(0, high, (b, length)).astype(np.int32)
    labels[batch["attention_mask"] == 0] = -100
    if kind == "causal_lm":
        labels[:, :3] = -100                  # an SFT-style prompt carries no labels
    else:
        labels[:, 0] = -100                   # [CLS]
    batch = dict(batch, labels=labels, example_mask=np.ones(b, np.float32))
    batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}     # + a padding row
    batch["example_mask"][-1] = 0.0
    # differentiate only the last layer and the head / final norm
    last = f"layers_{model.arch_cfg.num_layers - 1}"
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) in (last, "head", "final_norm") for k in path), params)
    mesh = one_device()
    step = make_fisher_step(model, "sft" if kind == "causal_lm" else kind, "empirical", mask, mesh,
                            replicated_like(params, mesh), chunk=2)
    sums, count, units = step(params, batch, jax.random.key(0))
    assert int(count) == b
    # what F is divided by: the real examples' labelled tokens (causal: those predicting labels[t+1])
    used = labels[:, 1:] if kind == "causal_lm" else labels
    assert int(units) == int((used != -100).sum())
    want = _hand_loop(model, params, mask, batch, kind)
    assert jax.tree.structure(sums) == jax.tree.structure(want)
    assert "embeddings" not in sums["backbone"] and last in sums["backbone"]
    # atol against the largest entry of all leaves: the attention key bias has a gradient that is
    # zero up to rounding (softmax ignores a per-query constant), ~1e-16 here
    scale = max(float(ref.max()) for ref in jax.tree.leaves(want))
    nonzero = 0
    for (path, got), ref in zip(jax.tree_util.tree_flatten_with_path(sums)[0], jax.tree.leaves(want)):
        assert got.dtype == jnp.float32
        nonzero += ref.max() > 1e-4 * scale
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=1e-6 * scale, err_msg=str(path))
    assert nonzero >= len(jax.tree.leaves(want)) - 1


def test_invalid_kinds_and_modes():
    mesh = one_device()
    params = {"Dense_0": {"kernel": jnp.zeros((D, C))}}
    make = lambda kind, mode: make_fisher_step(Linear(), kind, mode, all_true(params), mesh,
                                               replicated_like(params, mesh))
    for kind in ("mlm", "causal_lm", "sft"):
        with pytest.raises(TenureError, match="exact Fisher over a vocabulary is infeasible; use sampled or empirical"):
            make(kind, "exact")
    with pytest.raises(TenureError, match="token_cls"):
        make("token_cls", "exact")
    with pytest.raises(TenureError, match="mode 'true'"):
        make("seq_cls", "true")
    with pytest.raises(TenureError, match="selects no parameter"):
        make_fisher_step(Linear(), "seq_cls", "sampled", {"Dense_0": {"kernel": False}}, mesh,
                         replicated_like(params, mesh))
    assert FISHER_MODES == ("exact", "sampled", "empirical", "batched")


class LinearEmbedder(nn.Module):
    """query / passage embeddings = features @ W: the retrieval outputs of an embedding model."""

    @nn.compact
    def __call__(self, batch, deterministic=True):
        dense = nn.Dense(3, use_bias=False)
        return {"query_embeddings": dense(batch["query_x"]), "passage_embeddings": dense(batch["passage_x"])}


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_embedding_fisher_is_the_choice_among_each_query_s_own_passages(mode):
    """F of p(j | q) = softmax_j(q . p_j / t) over the record's passages (positive = 0), against a
    per-example loop; one passage per query has no choice to make and is refused."""
    rng = np.random.default_rng(3)
    n, passages, t = 12, 4, 0.5
    q, p = rng.normal(size=(n, D)).astype(np.float32), rng.normal(size=(n, passages, D)).astype(np.float32)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(D, 3)), jnp.float32)}}
    mesh = one_device()
    model = LinearEmbedder()
    step = make_fisher_step(model, "embedding", mode, all_true(params), mesh, replicated_like(params, mesh),
                            temperature=t)
    batch = {"query_x": q, "passage_x": p, "example_mask": np.ones(n, np.float32)}
    fisher, count = fisher_diagonal(step, params, [batch], jax.random.key(0))

    def logp(kernel, i):
        out = model.apply({"params": {"Dense_0": {"kernel": kernel}}}, {"query_x": q[i:i + 1], "passage_x": p[i:i + 1]})
        return jax.nn.log_softmax(jnp.einsum("bd,bpd->bp", out["query_embeddings"], out["passage_embeddings"])[0] / t)

    want = np.zeros((D, 3))
    for i in range(n):
        probs = np.exp(np.asarray(logp(params["Dense_0"]["kernel"], i)))
        for j in range(passages) if mode == "exact" else [0]:
            g = np.asarray(jax.grad(lambda k: logp(k, i)[j])(params["Dense_0"]["kernel"]), np.float64)
            want += (probs[j] if mode == "exact" else 1.0) * g**2 / n
    assert count == n
    np.testing.assert_allclose(np.asarray(fisher["Dense_0"]["kernel"]), want, rtol=1e-4)
    assert want.min() > 0
    single = dict(batch, passage_x=p[:, :1])
    with pytest.raises(TenureError, match="hard negatives"):
        fisher_diagonal(step, params, [single], jax.random.key(0))


# ----------------------------------------------------------------------------- pruned trees

def test_prune_pick_overlay_online_update():
    tree = {"a": {"k": np.ones(2), "b": np.zeros(3)}, "h": {"w": np.full(1, 2.0)}, "e": {"x": np.ones(1)}}
    mask = {"a": {"k": True, "b": False}, "h": True, "e": {"x": False}}
    pruned = prune(tree, mask)
    assert jax.tree.structure(pruned) == jax.tree.structure({"a": {"k": 0}, "h": {"w": 0}})
    assert pick(tree, pruned)["a"]["k"] is tree["a"]["k"]
    with pytest.raises(KeyError, match="a/zz"):
        pick(tree, {"a": {"zz": 0}})
    merged = overlay(tree, {"a": {"k": np.full(2, 7.0)}})
    assert merged["a"]["k"][0] == 7.0 and merged["a"]["b"] is tree["a"]["b"] and tree["a"]["k"][0] == 1.0

    old = {"a": {"k": jnp.array([1.0, 2.0])}, "gone": {"w": jnp.array([4.0])}}
    new = {"a": {"k": jnp.array([10.0, 20.0])}, "head": {"w": jnp.array([3.0])}}
    out = online_update(old, new, 0.5)
    np.testing.assert_array_equal(out["a"]["k"], [10.5, 21.0])
    np.testing.assert_array_equal(out["gone"]["w"], [2.0])
    np.testing.assert_array_equal(out["head"]["w"], [3.0])
    assert online_update(None, new, 0.5) is new
    with pytest.raises(ValueError, match="shape"):
        online_update({"k": jnp.zeros(2)}, {"k": jnp.zeros(3)}, 1.0)


# ----------------------------------------------------------------------------- sharding

TINY = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.0)


def _bert_batch(seed, batch_size=16, length=8):
    rng = np.random.default_rng(seed)
    attn = np.ones((batch_size, length), np.int32)
    attn[::3, length - 3:] = 0
    example_mask = np.ones(batch_size, np.float32)
    example_mask[-1] = 0.0
    return {"input_ids": rng.integers(1, TINY.vocab_size, (batch_size, length), dtype=np.int32),
            "attention_mask": attn, "labels": rng.integers(0, 4, batch_size, dtype=np.int32),
            "example_mask": example_mask}


@pytest.mark.parametrize("layout", [pytest.param(dict(data=8, fsdp=1), marks=pytest.mark.slow),
                                    dict(data=2, fsdp=2, tensor=2)])
def test_eight_devices_match_one_device(layout):
    model = build_task_model(TINY, "seq_cls", num_labels=4)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), _bert_batch(0))["params"]
    params_np = jax.tree.map(np.asarray, nn.unbox(boxed))
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "head" or "layers_0" in str(path),
                                            params_np)
    batches = [_bert_batch(1), _bert_batch(2)]
    results = {}
    for name, mesh in (("one", one_device()), ("many", make_mesh(MeshConfig(**layout)))):
        shardings = param_shardings(boxed, mesh)
        params = put_params(params_np, shardings)
        step = make_fisher_step(model, "seq_cls", "sampled", mask, mesh, shardings, chunk=1)
        F, count = fisher_diagonal(step, params, batches, jax.random.key(7))
        assert count == 30
        if name == "many":
            want = like_params_shardings(F, params, shardings, mesh)
            for got_leaf, want_sharding in zip(jax.tree.leaves(F), jax.tree.leaves(want)):
                assert got_leaf.sharding.spec == want_sharding.spec
            query = F["backbone"]["layers_0"]["attention"]["query"]["kernel"]
            assert query.sharding.spec == shardings["backbone"]["layers_0"]["attention"]["query"]["kernel"].spec
            assert len(query.sharding.device_set) == 8
        results[name] = jax.tree.map(np.asarray, F)
    assert "embeddings" not in results["one"]["backbone"]
    scale = max(float(a.max()) for a in jax.tree.leaves(results["one"]))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(results["one"])[0], jax.tree.leaves(results["many"])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7 * scale, err_msg=str(path))


# ----------------------------------------------------------------------------- class-incremental

class MaskedLinear(nn.Module):
    """Linear logits with a label mask per task (the task model's `label_masks`, -1e9 elsewhere)."""
    masks: tuple
    classes: int = 8

    @nn.compact
    def __call__(self, batch, deterministic=True):
        logits = nn.Dense(self.classes, use_bias=False)(batch["x"])
        return {"logits": jnp.where(jnp.asarray(self.masks, bool)[batch["task_id"]], logits, -1e9)}


def test_class_incremental_fisher_uses_the_task_s_own_classes():
    """heads: shared, stages A B C D of 4 classes each: task A's Fisher is taken with the head A
    was trained with (its 4 classes) whether it is taken at the start of B or of D, not with the
    16 classes D's head has; exact mode then runs 4 backward passes per example, not 16, and
    skipping the masked classes (p = 0) changes nothing."""
    from tenure.engine.train.build import RunTask, Tasks
    from tenure.engine.config.schema import load_config
    from tenure.engine.continual.stage_regularizers import fisher_head
    from tenure.engine.data.records import LabelVocab
    from tenure.engine.config.stages import resolve

    cfg = load_config(Path(__file__).parents[1] / "configs/forgetting/split_lexnames.yaml", ["heads=shared"])
    specs, stages = resolve(cfg)
    vocab = LabelVocab(label for task in specs.values() for label in task.data.labels)
    tasks = Tasks({name: RunTask(task, i, tuple(task.data.labels), {}) for i, (name, task) in enumerate(specs.items())},
                  "classification", vocab, True)
    a_classes = tuple(sorted(vocab._ids[label] for label in specs["A"].data.labels))
    masks_b, classes_b = fisher_head(cfg, tasks, stages, 1, "A")
    masks_d, classes_d = fisher_head(cfg, tasks, stages, 3, "A")
    assert classes_b == classes_d == a_classes and masks_b == masks_d
    assert sum(tasks.label_masks(stages[3], "shared")[0]) == 16      # what the old Fisher summed over
    assert len(fisher_head(cfg, tasks, stages, 3, "C")[1]) == 12      # C was trained with A's, B's and its own

    # numbers: 8 classes, task 0 trained on classes 0-3; later, task 1 adds 4-7 to the shared head
    rng = np.random.default_rng(11)
    x = rng.normal(size=(32, D)).astype(np.float32)
    batch = {"x": x, "labels": rng.integers(0, 4, 32).astype(np.int32), "task_id": np.zeros(32, np.int32),
             "example_mask": np.ones(32, np.float32)}
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(D, 8)).astype(np.float32))}}
    own, later = ((True,) * 4 + (False,) * 4,) * 2, ((True,) * 8,) * 2
    mesh = one_device()
    make = lambda masks, classes: make_fisher_step(MaskedLinear(masks), "seq_cls", "exact", all_true(params), mesh,
                                                   replicated_like(params, mesh), classes=classes)
    skipping, full = make(own, (0, 1, 2, 3)), make(own, None)
    assert skipping.passes == 4 and full.passes == "C"
    F_own, _ = fisher_diagonal(skipping, params, [batch], jax.random.key(0))
    F_all_classes, _ = fisher_diagonal(full, params, [batch], jax.random.key(0))
    np.testing.assert_allclose(kernel(F_own), kernel(F_all_classes), rtol=1e-6, atol=1e-12)
    z = x.astype(np.float64) @ np.asarray(params["Dense_0"]["kernel"], np.float64)[:, :4]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.einsum("nk,nj->jk", p * (1 - p), x.astype(np.float64) ** 2) / 32      # softmax over the 4
    np.testing.assert_allclose(kernel(F_own)[:, :4], want, rtol=1e-5)
    assert not np.any(kernel(F_own)[:, 4:])
    F_later, _ = fisher_diagonal(make(later, None), params, [batch], jax.random.key(0))
    assert rel(kernel(F_later)[:, :4], want) > 0.1        # the head of later stages gives another Fisher


def test_fisher_batches_hold_the_chosen_examples_not_eval_batch_rows():
    """Every row of a Fisher batch costs its backward passes, padding rows too. A Fisher over fewer
    examples than eval_batch_size takes them in one batch of just those rows (rounded up to a pass
    over the mesh's 8 data shards, or to whole passes of 8 a shard); more come in eval-size
    batches. That padding rows leave F unchanged: test_padding_rows_change_nothing."""
    from tenure.engine.config.schema import load_config
    from tenure.engine.continual.stage_regularizers import _fisher_batches
    from tenure.engine.train.trainer import Trainer
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/continual/split_lexnames.yaml",
                      [f"model.path={FIXTURES / 'bert/seq_cls'}", "tasks.A.data.eval_batch_size=128",
                       "tasks.A.data.pack=false", "tasks.B.data.pack=false"])
    trainer = Trainer(cfg)

    def shapes(examples):
        batches = _fisher_batches(trainer.backbone, trainer.tasks, "A", examples, 0, "ewc.examples")
        return [(b["input_ids"].shape[0], int(b["example_mask"].sum())) for b in batches]

    assert trainer.backbone.mesh.shape["data"] == 8   # tests/conftest.py: 8 CPU devices
    assert shapes(10) == [(16, 10)]
    assert shapes(24) == [(24, 24)]
    assert shapes(70) == [(128, 70)]              # 9 a shard: two passes of 8
    assert shapes(200) == [(128, 128), (128, 72)]
