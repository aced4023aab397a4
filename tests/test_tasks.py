"""Task heads: output shapes and values against hand-computed references."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from tenure.models.errors import TenureError
from tenure.models.bert import BertConfig
from tenure.models.gpt2 import GPT2Config
from tenure.models.heads import pool
from tenure.models.llama import LlamaConfig
from tenure.models.lora import LoRASpec
from tenure.models.tasks import build_task_model, graft_pretrained

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.int32)
BATCH = {"input_ids": np.arange(12, dtype=np.int32).reshape(2, 6) + 4, "attention_mask": MASK,
         "token_type_ids": np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)}


def _run(kind, batch=BATCH, cfg=TINY, **kwargs):
    model = build_task_model(cfg, kind, **kwargs)
    params = nn.unbox(model.init(jax.random.key(0), batch)["params"])
    hidden = model.apply({"params": params}, batch, method=lambda m, b: m.encode(b, "", True)[0]) \
        if "input_ids" in batch else None
    return model.apply({"params": params}, batch), params, None if hidden is None else np.asarray(hidden)


def _dense(p, x):
    return x @ np.asarray(p["kernel"]) + (np.asarray(p["bias"]) if "bias" in p else 0.0)


def test_pooling_values():
    hidden = np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 6, 2)
    np.testing.assert_array_equal(pool(hidden, MASK, "cls"), hidden[:, 0])
    np.testing.assert_allclose(pool(hidden, MASK, "mean")[1], hidden[1, :3].mean(0))
    np.testing.assert_array_equal(pool(hidden, MASK, "last"), np.stack([hidden[0, 5], hidden[1, 2]]))


def test_pair_cls_uses_pooler_and_token_types():
    out, params, hidden = _run("pair_cls", num_labels=3, pooling="cls")
    head = params["head"]
    expected = _dense(head["classifier"], np.tanh(_dense(head["pooler"]["dense"], hidden[:, 0])))
    assert out["logits"].shape == (2, 3)
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
    no_types, _, _ = _run("pair_cls", batch={k: v for k, v in BATCH.items() if k != "token_type_ids"}, num_labels=3)
    assert not np.allclose(no_types["logits"][0], out["logits"][0])  # row 0 has a second segment


def test_seq_cls_mean_pooling_and_regression():
    out, params, hidden = _run("seq_cls", num_labels=4, pooling="mean")
    pooled = np.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
    np.testing.assert_allclose(out["logits"], _dense(params["head"]["classifier"], pooled), rtol=1e-5, atol=1e-6)
    reg, reg_params, reg_hidden = _run("regression", pooling="cls")
    assert reg["logits"].shape == (2, 1) and reg["predictions"].shape == (2,)
    np.testing.assert_array_equal(reg["predictions"], reg["logits"][:, 0])


def test_token_cls_logits_per_token():
    out, params, hidden = _run("token_cls", num_labels=5)
    assert out["logits"].shape == (2, 6, 5)
    np.testing.assert_allclose(out["logits"], _dense(params["head"]["classifier"], hidden), rtol=1e-5, atol=1e-6)


def test_mlm_head_is_tied_to_word_embeddings():
    out, params, hidden = _run("mlm")
    head = params["head"]
    h = _dense(head["transform"], hidden)
    h = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-12)
    h = h * np.asarray(head["transform_norm"]["scale"]) + np.asarray(head["transform_norm"]["bias"])
    words = np.asarray(params["backbone"]["embeddings"]["word_embeddings"]["embedding"])
    assert out["logits"].shape == (2, 6, 50) and "decoder" not in head
    np.testing.assert_allclose(out["logits"], h @ words.T + np.asarray(head["bias"]), rtol=1e-4, atol=1e-5)


def test_embedding_and_retrieval_outputs():
    out, _, hidden = _run("embedding", batch={"input_ids": BATCH["input_ids"], "attention_mask": MASK}, pooling="mean")
    expected = np.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(out["embeddings"], expected, rtol=1e-5, atol=1e-6)
    passages = np.stack([BATCH["input_ids"][::-1], BATCH["input_ids"]], axis=1)  # [B, P=2, L]
    retrieval = {"query_input_ids": BATCH["input_ids"], "query_attention_mask": MASK,
                 "passage_input_ids": passages, "passage_attention_mask": np.stack([MASK[::-1], MASK], axis=1)}
    r, _, _ = _run("embedding", batch=retrieval, pooling="mean")
    assert r["query_embeddings"].shape == (2, 16) and r["passage_embeddings"].shape == (2, 2, 16)
    np.testing.assert_allclose(r["query_embeddings"], out["embeddings"], atol=1e-6)
    np.testing.assert_allclose(r["passage_embeddings"][:, 1], out["embeddings"], atol=1e-6)
    np.testing.assert_allclose(r["passage_embeddings"][1, 0], out["embeddings"][0], atol=1e-6)


def test_causal_lm_on_a_decoder_uses_tied_embeddings():
    cfg = GPT2Config(vocab_size=40, max_positions=16, hidden_size=16, num_layers=1, num_heads=2)
    batch = {"input_ids": BATCH["input_ids"], "attention_mask": MASK}
    out, params, hidden = _run("causal_lm", batch=batch, cfg=cfg)
    words = np.asarray(params["backbone"]["embeddings"]["token"])
    assert "head" not in params and out["logits"].shape == (2, 6, 40)
    np.testing.assert_allclose(out["logits"], hidden @ words.T, rtol=1e-5, atol=1e-5)
    cls_out, cls_params, cls_hidden = _run("seq_cls", batch=batch, cfg=cfg, pooling="last", num_labels=3)
    assert "bias" not in cls_params["head"]["classifier"]
    np.testing.assert_allclose(cls_out["logits"][1], cls_hidden[1, 2] @ np.asarray(cls_params["head"]["classifier"]["kernel"]),
                               rtol=1e-5, atol=1e-6)


def test_user_errors_name_the_config_key():
    with pytest.raises(TenureError, match="task.kind: 'ner'"):
        build_task_model(TINY, "ner")
    with pytest.raises(TenureError, match="task.pooling"):
        build_task_model(TINY, "seq_cls", pooling="max")
    with pytest.raises(TenureError, match="frozen_prefix=5"):
        build_task_model(TINY, "seq_cls", frozen_prefix=5)
    _, params, _ = _run("seq_cls", num_labels=3)
    bad_head = {"classifier": {"kernel": np.zeros((16, 7), np.float32)}}
    with pytest.raises(TenureError, match="head/classifier/kernel has shape \\(16, 7\\)"):
        graft_pretrained(params, params["backbone"], bad_head)


GPT2 = GPT2Config(vocab_size=40, max_positions=16, hidden_size=16, num_layers=2, num_heads=2)
LLAMA_GQA = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4, max_position_embeddings=16)
PACKED = {"input_ids": BATCH["input_ids"], "attention_mask": (MASK > 0).astype(np.int32),
          "segment_ids": np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0]], np.int32)}


@pytest.mark.parametrize("cfg,kind,batch", [(TINY, "token_cls", BATCH), (GPT2, "causal_lm", PACKED),
                                            (LLAMA_GQA, "causal_lm", PACKED)], ids=["bert", "gpt2", "llama_gqa"])
def test_xla_attention_gives_the_same_logits_in_eval(cfg, kind, batch):
    einsum, xla = (build_task_model(cfg, kind, num_labels=3, attention=a) for a in ("einsum", "xla"))
    params = nn.unbox(einsum.init(jax.random.key(0), batch)["params"])
    ref = einsum.apply({"params": params}, batch)["logits"]
    np.testing.assert_allclose(xla.apply({"params": params}, batch)["logits"], ref, rtol=1e-5, atol=1e-5)


def test_training_with_attention_dropout_falls_back_to_einsum():
    einsum, xla = (build_task_model(TINY, "seq_cls", num_labels=3, attention=a) for a in ("einsum", "xla"))
    params = nn.unbox(einsum.init(jax.random.key(0), BATCH)["params"])
    labels = np.array([0, 2])

    def loss(model):  # TINY has attention dropout 0.1
        logits = model.apply({"params": params}, BATCH, deterministic=False,
                             rngs={"dropout": jax.random.key(4)})["logits"]
        return float(-jax.nn.log_softmax(logits)[np.arange(2), labels].mean())

    assert loss(xla) == loss(einsum)


def test_attention_choice_errors_name_the_config_key():
    with pytest.raises(TenureError, match="model.attention: 'flash' is not one of einsum, xla, cudnn"):
        build_task_model(TINY, "seq_cls", attention="flash")
    if all(d.platform != "gpu" for d in jax.devices()):
        with pytest.raises(TenureError, match="^model.attention: cudnn needs an NVIDIA GPU with cuDNN; "
                                              "this JAX runs on cpu"):
            build_task_model(TINY, "seq_cls", attention="cudnn")


def test_every_param_carries_known_logical_axes():
    spec = LoRASpec(rank=2, targets=("query",))
    for kind in ("seq_cls", "mlm", "embedding"):
        model = build_task_model(TINY, kind, lora=spec)
        boxed = jax.eval_shape(model.init, jax.random.key(0), BATCH)["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves), kind
        names = {n for leaf in leaves for n in leaf.names if n is not None}
        assert names <= {"vocab", "embed", "heads", "kv_heads", "mlp", "norm", "position", "classes", "lora_rank"}
        specs = nn.get_partition_spec(boxed)
        assert tuple(specs["backbone"]["layers_0"]["attention"]["query"]["lora_a"]) == ("embed", "lora_rank")
        assert tuple(specs["backbone"]["embeddings"]["word_embeddings"]["embedding"]) == ("vocab", "embed")
