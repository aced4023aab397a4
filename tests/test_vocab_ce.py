"""The chunked vocabulary cross-entropy (tenure.engine.tasks.losses.vocab_ce) against the plain path (full
fp32 logits + log-softmax): same loss, accuracy and gradients, on raw arrays and through tiny
GPT-2 / Llama (untied head) causal LMs and a tiny BERT MLM, with -100 labels and padding rows."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tenure.engine.tasks import losses
from tenure.engine.config.schema import MeshConfig
from tenure.engine.tasks.kinds import KINDS
from tenure.engine.tasks.losses import IGNORE, _token_ce, vocab_ce
from tenure.engine.runtime.sharding import make_mesh, param_shardings
from tenure.engine.train.step import init_state, make_train_step
from tenure.models.bert import BertConfig
from tenure.models.gpt2 import GPT2Config
from tenure.models.heads import Vocab
from tenure.models.layers import vocab_logits
from tenure.models.llama import LlamaConfig
from tenure.models.tasks import build_task_model

RTOL = 1e-5


def _close(a, b, rtol=RTOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(1e-3, float(np.abs(y).max())))


def _arrays(rows=3, length=11, dim=8, vocab=37, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (rows, length, dim))
    table = jax.random.normal(k[1], (vocab, dim))
    bias = jax.random.normal(k[2], (vocab,))
    labels = jax.random.randint(k[3], (rows, length), 0, vocab)
    return h, table, bias, labels


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
def test_vocab_ce_matches_plain_log_softmax(chunk):
    h, table, bias, labels = _arrays()
    labels = labels.at[0, 3:].set(IGNORE).at[1, ::2].set(IGNORE)   # ragged label counts
    example_mask = jnp.array([1.0, 1.0, 0.0])                     # row 2 is padding

    def chunked(h, table, bias):
        valid = (labels != IGNORE) * example_mask[:, None]
        nll, hits = vocab_ce(Vocab(h, table, bias), jnp.where(labels == IGNORE, 0, labels), valid, chunk)
        return nll / valid.sum(), hits / valid.sum()

    def plain(h, table, bias):
        loss, aux = _token_ce(vocab_logits(h, table, bias), labels, example_mask)
        return loss, aux["accuracy"]

    (loss, acc), grads = jax.jit(jax.value_and_grad(chunked, (0, 1, 2), has_aux=True))(h, table, bias)
    (ref, ref_acc), ref_grads = jax.value_and_grad(plain, (0, 1, 2), has_aux=True)(h, table, bias)
    _close(loss, ref)
    assert float(acc) == float(ref_acc)
    _close(grads, ref_grads)
    assert not np.any(np.asarray(grads[0][2]))  # the padding row gets no gradient
    np.testing.assert_allclose(jax.jit(chunked)(h, table, bias)[0], ref, rtol=RTOL)  # no-grad path


def test_vocab_ce_with_no_labels_is_zero_with_zero_gradients():
    h, table, _, labels = _arrays()
    f = lambda h, table: vocab_ce(Vocab(h, table, None), labels, jnp.zeros(labels.shape), 4)[0]
    value, (dh, dtable) = jax.value_and_grad(f, (0, 1))(h, table)
    assert float(value) == 0.0 and not np.any(np.asarray(dh)) and not np.any(np.asarray(dtable))


def test_vocab_ce_bf16_close_to_plain():
    h, table, _, labels = _arrays(length=16)
    h, table = h.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
    mask = jnp.ones(labels.shape[0])
    f = lambda h, t: vocab_ce(Vocab(h, t, None), labels, jnp.ones(labels.shape), 4)[0] / labels.size
    g = lambda h, t: _token_ce(vocab_logits(h, t), labels, mask)[0]
    (a, da), (b, db) = jax.value_and_grad(f, (0, 1))(h, table), jax.value_and_grad(g, (0, 1))(h, table)
    assert da[0].dtype == jnp.bfloat16 and da[1].dtype == jnp.bfloat16
    _close(a, b, rtol=1e-2)
    _close(da, db, rtol=2e-2)


GPT2 = GPT2Config(vocab_size=61, max_positions=16, hidden_size=16, num_layers=2, num_heads=2)
LLAMA = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8, max_position_embeddings=16, tie_word_embeddings=False)
BERT = BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16)


def _batch(kind, rows=4, length=10):
    rng = np.random.default_rng(0)
    mask = np.ones((rows, length), np.int32)
    mask[1, 6:] = 0                                         # right padding
    ids = np.where(mask == 1, rng.integers(4, 61, (rows, length)), 0).astype(np.int32)
    if kind == "mlm":
        labels = np.where((rng.random((rows, length)) < 0.3) & (mask == 1), ids, IGNORE)
        labels[0, :] = IGNORE                               # a row with nothing to predict
    else:
        labels = np.where(mask == 1, ids, IGNORE)
        labels[2, :4] = IGNORE                              # an SFT-style prompt
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": labels.astype(np.int32), "example_mask": np.array([1, 1, 1, 0], np.float32)}


@pytest.mark.parametrize("arch,kind", [(GPT2, "causal_lm"), (LLAMA, "causal_lm"), (BERT, "mlm")],
                         ids=["gpt2-tied", "llama-untied", "bert-mlm"])
def test_model_loss_and_grads_equal_the_full_logits_path(arch, kind):
    model = build_task_model(arch, kind)
    batch = _batch(kind)
    params = nn.unbox(model.init(jax.random.key(0), batch)["params"])
    loss = KINDS[kind].loss()

    def value(params, logits):
        outputs = model.apply({"params": params}, batch, logits=logits)
        assert ("logits" in outputs) == logits and ("vocab" in outputs) != logits
        return loss(params, outputs, batch, {})

    (chunked, aux), grads = jax.jit(jax.value_and_grad(lambda p: value(p, False), has_aux=True))(params)
    (plain, ref_aux), ref_grads = jax.jit(jax.value_and_grad(lambda p: value(p, True), has_aux=True))(params)
    _close(chunked, plain)
    assert float(aux["accuracy"]) == float(ref_aux["accuracy"]) and float(aux["tokens"]) == float(ref_aux["tokens"])
    _close(grads, ref_grads)
    if arch is LLAMA:
        assert np.any(np.asarray(grads["head"]["lm_head"]["kernel"]))


def test_train_step_uses_the_chunked_loss_and_logs_accuracy(monkeypatch):
    monkeypatch.setattr(losses, "LM_CHUNK_TOKENS", 16)  # 4 rows: 10 positions -> 3 chunks of 4
    model = build_task_model(GPT2, "causal_lm")
    batch = _batch("causal_lm")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    boxed = model.init(jax.random.key(0), batch)["params"]
    params = nn.unbox(boxed)
    tx = optax.adamw(1e-3)
    state, shardings = init_state(params, tx, 0, mesh, param_shardings(boxed, mesh))
    mask = jax.tree.map(lambda _: True, params)
    step = make_train_step(model, {"task": KINDS["causal_lm"].loss()}, tx, mesh, shardings,
                           lr_schedule=optax.constant_schedule(1e-3), trainable_mask=mask)
    text = step.lower(state, batch).as_text()
    assert "4x10x61xf32" not in text and "4x4x61xf32" in text  # chunks, never the full [B, L, V]
    _, ref_aux = KINDS["causal_lm"].loss()(params, model.apply({"params": params}, batch), batch, {})
    _, metrics = step(state, batch)  # donates the state (and params)
    assert 0.0 <= float(metrics["task/accuracy"]) <= 1.0
    assert float(metrics["task/tokens"]) == float(ref_aux["tokens"])
    assert np.isfinite(float(metrics["loss"]))
