"""Trainability spec -> labels, LR multipliers, forward-only prefix, counts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tenure.models.errors import TenureError
from tenure.engine.train.trainability import FROZEN, TrainableConfig, compile_trainability, first_unmatched
from tenure.models.bert import BertConfig
from tenure.models.lora import LoRASpec
from tenure.models.tasks import build_task_model

L = 3


def fake_params(lora=False):
    """A param tree shaped like the task-model contract (leaf sizes chosen to be countable)."""
    dense = lambda i, o: {"kernel": np.zeros((i, o), np.float32), "bias": np.zeros(o, np.float32)}
    layer = {"attention": {"query": dense(4, 4), "value": dense(4, 4)},
             "attention_norm": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}}
    if lora:
        layer["attention"]["query"].update(lora_a=np.zeros((4, 2), np.float32), lora_b=np.zeros((2, 4), np.float32))
    backbone = {"embeddings": {"word_embeddings": {"embedding": np.zeros((10, 4), np.float32)},
                               "norm": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}},
                "final_norm": {"scale": np.ones(4, np.float32)}}
    backbone.update({f"layers_{i}": {k: dict(v) for k, v in layer.items()} for i in range(L)})
    return {"backbone": backbone, "head": {"classifier": dense(4, 2)}}


def labels_of(tr):
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                flat[prefix + k] = v

    walk(tr.labels, "")
    return flat


def trainable_paths(tr):
    return sorted(p for p, label in labels_of(tr).items() if label != FROZEN)


def test_full_trains_everything_with_no_prefix():
    tr = compile_trainability(fake_params(), TrainableConfig(), L)
    assert set(labels_of(tr).values()) == {"trainable"}
    assert tr.frozen_prefix == 0 and tr.frozen_count == 0
    # 40 embedding + 8 emb norm + 4 final norm + 3 * (2*(16+4) + 8) + head 10
    assert tr.trainable_count == 40 + 8 + 4 + 3 * 48 + 10
    assert tr.summary() == ("trainable 206/206 params (100.00%), forward-only stages 0/4, "
                            "lr groups: trainablex1")


def test_head_only_freezes_the_backbone():
    tr = compile_trainability(fake_params(), TrainableConfig(mode="head"), L)
    assert trainable_paths(tr) == ["head/classifier/bias", "head/classifier/kernel"]
    assert tr.frozen_prefix == L + 1
    assert (tr.trainable_count, tr.frozen_count) == (10, 196)


def test_last_n_trains_top_layers_and_final_norm():
    tr = compile_trainability(fake_params(), TrainableConfig(mode="last_n", last_n=1), L)
    paths = trainable_paths(tr)
    assert all(p.startswith(("backbone/layers_2/", "backbone/final_norm/", "head/")) for p in paths)
    assert "backbone/final_norm/scale" in paths and len(paths) == 6 + 1 + 2  # 6 leaves in a layer
    assert tr.frozen_prefix == 3  # embeddings, layers_0, layers_1 run forward-only
    with pytest.raises(TenureError, match="trainable.last_n"):
        compile_trainability(fake_params(), TrainableConfig(mode="last_n", last_n=4), L)


def test_bitfit_and_lora_select_leaves_by_name():
    bitfit = compile_trainability(fake_params(), TrainableConfig(mode="bitfit"), L)
    assert all(p.endswith("bias") or p.startswith("head/") for p in trainable_paths(bitfit))
    assert bitfit.frozen_prefix == 0  # the embeddings' norm bias trains
    lora = compile_trainability(fake_params(lora=True), TrainableConfig(mode="lora"), L)
    paths = trainable_paths(lora)
    assert paths[:2] == ["backbone/layers_0/attention/query/lora_a", "backbone/layers_0/attention/query/lora_b"]
    assert len(paths) == 2 * L + 2 and lora.frozen_prefix == 1
    no_head = compile_trainability(fake_params(lora=True), TrainableConfig(mode="lora", train_head=False), L)
    assert not any(p.startswith("head/") for p in trainable_paths(no_head))


def test_regex_include_exclude():
    cfg = TrainableConfig(mode="regex", include=[r"layers_1/", r"embeddings/norm"], exclude=[r"/bias$"])
    paths = trainable_paths(compile_trainability(fake_params(), cfg, L))
    assert paths == ["backbone/embeddings/norm/scale", "backbone/layers_1/attention/query/kernel",
                     "backbone/layers_1/attention/value/kernel", "backbone/layers_1/attention_norm/scale",
                     "head/classifier/kernel"]
    with pytest.raises(ValueError, match="bad regex"):
        TrainableConfig(include=["("])
    with pytest.raises(TenureError, match="no parameter is trainable"):
        compile_trainability(fake_params(), TrainableConfig(mode="regex", train_head=False), L)


def test_llrd_multipliers_are_exact_powers():
    decay = 0.8
    tr = compile_trainability(fake_params(), TrainableConfig(llrd={"decay": decay}), L)
    mults = tr.lr_multipliers
    for layer in range(L):
        assert mults[f"layers_{layer}"] == decay ** (L - layer)
    assert mults["embeddings"] == decay ** (L + 1)
    assert mults["top"] == 1.0
    labels = labels_of(tr)
    assert labels["backbone/layers_1/attention/query/kernel"] == "layers_1"
    assert labels["backbone/final_norm/scale"] == "top" and labels["head/classifier/kernel"] == "top"
    assert labels["backbone/embeddings/word_embeddings/embedding"] == "embeddings"


def bert_lora_params():
    """The abstract params of a 2-layer BERT classifier with adapters on query and value."""
    cfg = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=8)
    model = build_task_model(cfg, "seq_cls", num_labels=3, lora=LoRASpec(rank=2, targets=("query", "value")))
    batch = {"input_ids": jnp.ones((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4), jnp.int32)}
    return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"])


def test_real_bert_lora_plus_head():
    tr = compile_trainability(bert_lora_params(), TrainableConfig(mode="lora"), 2)
    paths = trainable_paths(tr)
    lora = [p for p in paths if p.startswith("backbone/")]
    assert lora == [f"backbone/layers_{i}/attention/{m}/{leaf}" for i in range(2)
                    for m in ("query", "value") for leaf in ("lora_a", "lora_b")]
    assert all(p.startswith("head/") for p in paths if p not in lora)
    assert tr.frozen_prefix == 1  # embeddings run forward-only
    assert tr.trainable_count == 2 * 2 * (8 * 2 + 2 * 8) + (8 * 8 + 8) + (8 * 3 + 3)


def test_the_first_lora_target_or_regex_that_matches_nothing_is_found():
    params = bert_lora_params()
    assert first_unmatched(params, TrainableConfig(mode="lora", lora={"targets": ["query", "qeury"]})) == (
        "lora.targets", "'qeury' matches no linear layer of the model "
                        "(its linear layers: attn_out, key, query, value, intermediate, output)")
    assert first_unmatched(params, TrainableConfig(mode="regex", include=["layers_1/", "nomatch_xyz"])) == (
        "include", "'nomatch_xyz' matches no parameter path "
                   "(paths look like 'backbone/layers_0/attention/attn_out/kernel')")
    assert first_unmatched(params, TrainableConfig(exclude=["nomatch_xyz"]))[0] == "exclude"
    # A match is a match whatever the mode makes of it: the head that trains anyway, the embeddings
    # LoRA freezes anyway, a head kept frozen; and the targets of another mode are not read.
    for cfg in (TrainableConfig(mode="head", include=["^head/"]),
                TrainableConfig(mode="lora", exclude=["embeddings"], lora={"targets": ["intermediate"]}),
                TrainableConfig(mode="lora", train_head=False, exclude=["classifier"]),
                TrainableConfig(mode="full", lora={"targets": ["qeury"]})):
        assert first_unmatched(params, cfg) is None
