"""BERT encoder: HF parity (committed fixtures), MiniLM vs sentence-transformers, padding and
packing invariance, frozen_prefix, remat.

Relative error = max|engine - HF| / max|HF| over real tokens (see models/parity.py)."""
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.models.bert import BertConfig, BertEncoder
from tenure.models.hf import load_hf
from tenure.models.parity import check_parity
from tenure.models.tasks import build_task_model, graft_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
TINY = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=32, max_position_embeddings=24, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)


def _ids(rng, batch, length):
    return rng.integers(4, TINY.vocab_size, size=(batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", ["seq_cls", "token_cls", "mlm", "roberta_mlm"])
def test_parity_with_hf_fixture(name):
    report = check_parity(FIXTURES / "bert" / name, prefer="fixture")
    print(report.summary())
    assert "logits" in report.checks and len(report.checks) == 4
    assert report.max_rel <= 1e-4 and report.ok


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers():
    ref = np.load(FIXTURES / "minilm" / "reference.npz")
    arch_cfg, backbone, head, tokenizer = load_hf("minilm")
    tokens = tokenizer([str(s) for s in ref["sentences"]], padding=True, return_tensors="np")
    np.testing.assert_array_equal(tokens["input_ids"], ref["input_ids"])
    batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    model = build_task_model(arch_cfg, "embedding", pooling="mean")
    params = graft_pretrained(nn.unbox(model.init(jax.random.key(0), batch)["params"]), backbone, head)
    ours = np.asarray(model.apply({"params": params}, batch)["embeddings"])
    theirs = ref["embeddings"]
    cosine = np.sum(ours * theirs, axis=-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    print(f"minilm: min cosine {cosine.min():.8f}, max abs diff {np.abs(ours - theirs).max():.2e}")
    assert cosine.min() > 0.9999
    assert np.abs(ours - theirs).max() < 1e-5


def _encoder_and_params():
    """A BertEncoder's apply and its params (eager: jit compiles cost more at these sizes)."""
    encoder = BertEncoder(TINY)
    ids = np.zeros((1, 4), np.int32)
    params = nn.unbox(encoder.init(jax.random.key(0), ids, np.ones_like(ids))["params"])
    return encoder.apply, params


def test_padding_does_not_change_real_tokens():
    rng = np.random.default_rng(0)
    encoder, params = _encoder_and_params()
    ids = _ids(rng, 1, 7)
    alone = encoder({"params": params}, ids, np.ones_like(ids))
    padded_ids = np.concatenate([ids, np.zeros((1, 5), np.int32)], axis=1)
    mask = (np.arange(12) < 7).astype(np.int32)[None]
    padded = encoder({"params": params}, padded_ids, mask)
    np.testing.assert_allclose(padded[:, :7], alone, atol=2e-6)
    assert np.isfinite(np.asarray(padded)).all()


def test_packed_row_equals_examples_run_separately():
    rng = np.random.default_rng(1)
    encoder, params = _encoder_and_params()
    first, second = _ids(rng, 1, 5), _ids(rng, 1, 3)
    pad = lambda ids: np.pad(ids, ((0, 0), (0, 12 - ids.shape[1])))  # one shape: eager op caches are reused
    packed_ids = pad(np.concatenate([first, second], axis=1))
    segments = pad(np.array([[1] * 5 + [2] * 3], np.int32))
    positions = pad(np.array([[0, 1, 2, 3, 4, 0, 1, 2]], np.int32))
    packed = encoder({"params": params}, packed_ids, (segments > 0).astype(np.int32),
                     segment_ids=segments, positions=positions)
    alone_first = encoder({"params": params}, pad(first), pad(np.ones_like(first)))
    alone_second = encoder({"params": params}, pad(second), pad(np.ones_like(second)))
    np.testing.assert_allclose(packed[:, :5], alone_first[:, :5], atol=2e-6)
    np.testing.assert_allclose(packed[:, 5:8], alone_second[:, :3], atol=2e-6)


@functools.lru_cache(maxsize=None)
def _grads(frozen_prefix, remat="none"):
    rng = np.random.default_rng(2)
    batch = {"input_ids": _ids(rng, 2, 6), "attention_mask": np.ones((2, 6), np.int32),
             "labels": np.array([0, 1], np.int32)}
    model = build_task_model(TINY, "seq_cls", num_labels=2, frozen_prefix=frozen_prefix, remat=remat)
    params = nn.unbox(build_task_model(TINY, "seq_cls", num_labels=2).init(jax.random.key(0), batch)["params"])

    def loss(p):
        logits = model.apply({"params": p}, batch)["logits"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], axis=1)), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads


def test_frozen_prefix_zeroes_frozen_grads_and_keeps_outputs():
    value_all, logits_all, grads_all = _grads(0)
    value, logits, grads = _grads(2)  # embeddings + layers_0 frozen
    np.testing.assert_array_equal(logits, logits_all)
    for stage in ("embeddings", "layers_0"):
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["backbone"][stage])), stage
        assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads_all["backbone"][stage])), stage
    for a, b in zip(jax.tree.leaves(grads["backbone"]["layers_1"]), jax.tree.leaves(grads_all["backbone"]["layers_1"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(value) == float(value_all)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_outputs_and_grads(remat):
    value, _, grads = _grads(0)
    value_remat, _, grads_remat = _grads(0, remat)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_config_round_trips_through_hf_dict():
    hf = TINY.to_hf()
    assert hf["num_hidden_layers"] == 2 and hf["model_type"] == "bert" and "pooler" not in hf
    assert BertConfig.from_hf(hf) == TINY
    roberta = BertConfig.from_hf({**hf, "model_type": "roberta", "pad_token_id": 1})
    assert roberta.position_offset == 2
