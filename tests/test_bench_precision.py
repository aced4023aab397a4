"""The speed options of the train step compute the same thing: oneDNN dots vs XLA's default
dots (fp32, to fp32 rounding), bf16 compute vs fp32 after training (to bf16 tolerance), and
rbg dropout keys drop the configured share of units."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.losses import task_losses
from engine.optim import OptimConfig, build_optimizer, build_schedule
from engine.sharding import MeshConfig, init_sharded, make_mesh
from engine.step import dropout_key, init_state, make_train_step
from engine.trainability import TrainableConfig, compile_trainability
from engine.xla_env import ONEDNN_OPTIONS
from models.bert import BertConfig
from models.tasks import build_task_model

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
    step = make_train_step(model, task_losses("seq_cls"), tx, mesh, state_shardings,
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


def test_bf16_training_reaches_the_fp32_loss():
    _, fp32 = train("float32", True, STEPS)
    _, bf16 = train("bfloat16", True, STEPS)
    assert fp32[-5:].mean() < 0.5 * fp32[:5].mean()  # it learned something
    assert bf16[-5:].mean() == pytest.approx(fp32[-5:].mean(), rel=0.15, abs=0.02)
    assert not np.array_equal(bf16, fp32)  # really computed in bf16


@pytest.mark.parametrize("impl", ["threefry", "rbg"])
def test_dropout_keys_drop_the_configured_share(impl):
    key = dropout_key(jax.random.fold_in(jax.random.PRNGKey(3), 7), impl)
    out = nn.Dropout(0.1).apply({}, jnp.ones((200_000,)), deterministic=False, rngs={"dropout": key})
    dropped = float((out == 0).mean())
    assert dropped == pytest.approx(0.1, abs=0.004)
    assert float(out.max()) == pytest.approx(1 / 0.9)
    other = dropout_key(jax.random.fold_in(jax.random.PRNGKey(3), 8), impl)
    again = nn.Dropout(0.1).apply({}, jnp.ones((200_000,)), deterministic=False, rngs={"dropout": other})
    assert not np.array_equal(np.asarray(out), np.asarray(again))  # a new mask every step
