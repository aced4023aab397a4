"""The speed options of the train step compute the same thing: oneDNN dots vs XLA's default
dots (fp32, to fp32 rounding), bf16 compute vs fp32 after training (to bf16 tolerance), and
dropout's cheap masks drop the configured share of units, independently and shard-invariantly."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.extend.random import threefry2x32_p

from tenure.engine.tasks.kinds import KINDS
from tenure.engine.train.optim import OptimConfig, build_optimizer, build_schedule
from tenure.engine.runtime.sharding import MeshConfig, init_sharded, make_mesh
from tenure.engine.train.step import init_state, make_train_step
from tenure.engine.train.trainability import TrainableConfig, compile_trainability
from tenure.engine.runtime.xla_env import ONEDNN_OPTIONS, compiler_options
from tenure.models.bert import BertConfig
from tenure.models.layers import ACTIVATIONS, KEEP_RESOLUTION, Dropout, keep_mask, layer_boundary, threefry2x32
from tenure.models.tasks import build_task_model

TINY = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1)


STEPS, SNAPSHOT = 30, 3


def batches(count, rows=8, length=12):
    """A learnable task: the first token says the label (4 distinct batches, cycled)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        ids = rng.integers(6, TINY.vocab_size, (rows, length)).astype(np.int32)
        labels = rng.integers(0, 2, rows).astype(np.int32)
        ids[:, 0] = 4 + labels
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
                    "example_mask": np.ones(rows, np.float32)})
    return [out[i % 4] for i in range(count)]


@functools.cache
def train(dtype_name, onednn: bool, steps: int):
    """(params after SNAPSHOT steps as numpy, losses of every step)."""
    dtype, xla_options = jnp.dtype(dtype_name), dict(ONEDNN_OPTIONS) if onednn else {}
    data = batches(steps)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    model = build_task_model(TINY, "seq_cls", num_labels=2, pooling="cls", dtype=dtype)
    params, shardings = init_sharded(lambda: model.init(jax.random.key(0), data[0])["params"], mesh)
    optim = OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant")
    tr = compile_trainability(params, TrainableConfig(), TINY.num_hidden_layers)
    tx = build_optimizer(optim, tr, total_steps=len(data))
    state, state_shardings = init_state(params, tx, 0, mesh, shardings)
    step = make_train_step(model, {"task": KINDS["seq_cls"].loss()}, tx, mesh, state_shardings,
                           lr_schedule=build_schedule(optim, len(data)), trainable_mask=tr.trainable_mask,
                           xla_options=xla_options)
    losses, snapshot = [], None
    for i, batch in enumerate(data):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if i + 1 == SNAPSHOT:
            snapshot = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    return snapshot, np.array(losses)


def test_onednn_dots_match_xla_default_in_fp32():
    ref_params, ref_losses = train("float32", False, SNAPSHOT)
    params, losses = train("float32", True, STEPS)
    np.testing.assert_allclose(losses[:SNAPSHOT], ref_losses, rtol=1e-5)
    for got, want in zip(params, ref_params):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_dot_path_follows_the_compute_dtype_and_the_cpu(monkeypatch):
    """oneDNN for 16-bit compute on any CPU; for fp32 only on AVX-512 CPUs (XLA's default dots win
    fp32 on AVX2, docs/performance.md); TENURE_XLA_ONEDNN=1 / 0 forces it; GPU / TPU get nothing."""
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    monkeypatch.delenv("TENURE_XLA_ONEDNN", raising=False)
    assert compiler_options("cpu", jnp.bfloat16) == ONEDNN_OPTIONS
    assert compiler_options("cpu", jnp.float32) == (ONEDNN_OPTIONS if "avx512f" in flags else {})
    assert compiler_options("cpu", jnp.float32, onednn=True) == ONEDNN_OPTIONS
    assert compiler_options("cpu", jnp.bfloat16, onednn=False) == {}
    assert compiler_options("gpu", jnp.bfloat16) == {} and compiler_options("gpu", jnp.float32, onednn=True) == {}
    monkeypatch.setenv("TENURE_XLA_ONEDNN", "1")
    assert compiler_options("cpu", jnp.float32) == ONEDNN_OPTIONS
    monkeypatch.setenv("TENURE_XLA_ONEDNN", "0")
    assert compiler_options("cpu", jnp.bfloat16) == {}


def test_bf16_training_reaches_the_fp32_loss():
    _, fp32 = train("float32", True, STEPS)
    _, bf16 = train("bfloat16", True, STEPS)
    assert fp32[-5:].mean() < 0.5 * fp32[:5].mean()  # it learned something
    assert bf16[-5:].mean() == pytest.approx(fp32[-5:].mean(), rel=0.15, abs=0.02)
    assert not np.array_equal(bf16, fp32)  # really computed in bf16


def test_dropout_drops_the_configured_share_and_keeps_the_mean():
    key = jax.random.fold_in(jax.random.PRNGKey(3), 7)
    ones = jnp.ones((250, 803))  # a last axis that is not a multiple of the four draws per block
    out = np.asarray(Dropout(0.1).apply({}, ones, deterministic=False, rngs={"dropout": key}))
    dropped = float((out == 0).mean())
    assert dropped == pytest.approx(0.1, abs=0.003)
    kept = round(0.9 * KEEP_RESOLUTION)
    assert set(np.unique(out).tolist()) == {0.0, np.float32(KEEP_RESOLUTION / kept)}
    assert out.mean() == pytest.approx(1.0, abs=0.004)  # inverted dropout keeps the expectation
    other = jax.random.fold_in(jax.random.PRNGKey(3), 8)
    again = np.asarray(Dropout(0.1).apply({}, ones, deterministic=False, rngs={"dropout": other}))
    assert not np.array_equal(out, again)  # a new mask every step
    assert np.array_equal(Dropout(0.1).apply({}, ones, deterministic=True), ones)


def test_keep_mask_draws_are_independent_and_do_not_depend_on_sharding():
    """Neighbouring elements share a threefry block (four 16-bit draws each): they must still be
    uncorrelated, and a mask computed under a batch-sharded jit must equal the unsharded one."""
    key = jax.random.PRNGKey(11)
    mask = np.asarray(keep_mask(key, 0.5, (64, 4096)), np.float64)
    for lag in (1, 2, 3, 4):  # within a block (1-3) and across blocks (4)
        corr = np.corrcoef(mask[:, :-lag].ravel(), mask[:, lag:].ravel())[0, 1]
        assert abs(corr) < 0.01, (lag, corr)
    assert abs(np.corrcoef(mask[:-1].ravel(), mask[1:].ravel())[0, 1]) < 0.01  # across rows
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))  # 8 shards of 8 rows
    sharded = jax.jit(lambda k: keep_mask(k, 0.5, (64, 4096)),
                      out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))(key)
    assert np.array_equal(np.asarray(sharded, np.float64), mask)


def test_unrolled_threefry_equals_jax_threefry_bit_for_bit():
    key = jax.random.key_data(jax.random.PRNGKey(5))
    hi = jnp.arange(4096, dtype=jnp.uint32) * 7919
    lo = jnp.arange(4096, dtype=jnp.uint32)[::-1] * 131 + jnp.uint32(0xFFFF0000)
    expected = threefry2x32_p.bind(key[0], key[1], hi, lo)
    got = jax.jit(threefry2x32)(key[0], key[1], hi, lo)
    for e, g in zip(expected, got):
        assert np.array_equal(np.asarray(e), np.asarray(g))


def test_gelu_through_erf_matches_the_exact_gelu():
    """The erf form (PyTorch's) against float64: within fp32 rounding of the largest values,
    and its gradient within the same, over the range activations take."""
    x64 = np.linspace(-10, 10, 100_001)
    exact = x64 * 0.5 * (1 + scipy.special.erf(x64 / np.sqrt(2)))
    x = jnp.asarray(x64, jnp.float32)
    gelu = ACTIVATIONS["gelu"]
    assert np.abs(np.asarray(gelu(x), np.float64) - exact).max() < 2e-6
    dexact = 0.5 * (1 + scipy.special.erf(x64 / np.sqrt(2))) + x64 * np.exp(-x64 ** 2 / 2) / np.sqrt(2 * np.pi)
    dgot = np.asarray(jax.vmap(jax.grad(gelu))(x), np.float64)
    assert np.abs(dgot - dexact).max() < 2e-6


def test_layer_boundary_is_the_identity_for_values_and_gradients():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    assert np.array_equal(layer_boundary(x), x)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(layer_boundary(x * 3.0)))))(x)
    np.testing.assert_allclose(grad, 3.0 * jnp.cos(x * 3.0), rtol=1e-6)
