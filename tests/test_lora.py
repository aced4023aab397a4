"""LoRA: adapter placement, zero-init identity, merge equality, adapter extraction, dropout."""
import flax.linen as nn
import jax
import numpy as np

from tenure.models.bert import BertConfig
from tenure.models.lora import LoRASpec, lora_only, lora_paths, merge_lora, strip_lora
from tenure.models.tasks import build_task_model

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
SPEC = LoRASpec(rank=2, alpha=8.0, targets=("query", "value", "intermediate"))
BATCH = {"input_ids": (np.arange(12, dtype=np.int32).reshape(2, 6) * 7) % 46 + 4,
         "attention_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], np.int32)}


def _model_and_params(spec=SPEC):
    model = build_task_model(TINY, "seq_cls", num_labels=3, lora=spec)
    return model, nn.unbox(model.init(jax.random.key(0), BATCH)["params"])


def _randomize_lora_b(params):
    keys = iter(jax.random.split(jax.random.key(1), 100))

    def walk(node):
        if isinstance(node, dict):
            return {k: (jax.random.normal(next(keys), v.shape) * 0.3 if k == "lora_b" else walk(v))
                    for k, v in node.items()}
        return node

    return walk(params)


def test_adapters_sit_on_the_targets_only():
    _, params = _model_and_params()
    paths = {"/".join(p) for p in lora_paths(params)}
    assert paths == {f"backbone/layers_{i}/{m}" for i in range(2)
                     for m in ("attention/query", "attention/value", "mlp/intermediate")}
    layer = params["backbone"]["layers_0"]
    assert layer["attention"]["query"]["lora_a"].shape == (16, 2)
    assert layer["mlp"]["intermediate"]["lora_b"].shape == (2, 32)
    assert "lora_a" not in layer["attention"]["key"]


def test_zero_init_adapters_leave_outputs_unchanged():
    model, params = _model_and_params()
    base_model = build_task_model(TINY, "seq_cls", num_labels=3)
    with_lora = model.apply({"params": params}, BATCH)["logits"]
    without = base_model.apply({"params": strip_lora(params)}, BATCH)["logits"]
    np.testing.assert_array_equal(with_lora, without)


def _hidden(model, params):
    """Backbone output: O(1) after LayerNorm, so 1e-5 is a meaningful tolerance."""
    return np.asarray(model.apply({"params": params}, BATCH, method=lambda m, b: m.encode(b, "", True)[0]))


def test_merged_model_matches_unmerged():
    model, params = _model_and_params()
    params = _randomize_lora_b(params)
    plain_model = build_task_model(TINY, "seq_cls", num_labels=3)
    merged_params = merge_lora(params, SPEC)
    assert lora_paths(merged_params) == []
    unmerged = _hidden(model, params)
    np.testing.assert_allclose(_hidden(plain_model, merged_params), unmerged, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(plain_model.apply({"params": merged_params}, BATCH)["logits"],
                               model.apply({"params": params}, BATCH)["logits"], atol=1e-6)
    assert np.abs(_hidden(plain_model, strip_lora(params)) - unmerged).max() > 0.1  # adapters matter
    value = params["backbone"]["layers_1"]["attention"]["value"]
    np.testing.assert_allclose(merged_params["backbone"]["layers_1"]["attention"]["value"]["kernel"],
                               value["kernel"] + value["lora_a"] @ value["lora_b"] * 4.0, rtol=1e-6, atol=1e-7)


def test_lora_only_extracts_adapter_leaves():
    _, params = _model_and_params()
    adapters = lora_only(params)
    leaves = jax.tree_util.tree_flatten_with_path(adapters)[0]
    assert len(leaves) == 12 and {p[-1].key for p, _ in leaves} == {"lora_a", "lora_b"}
    np.testing.assert_array_equal(adapters["backbone"]["layers_0"]["attention"]["query"]["lora_a"],
                                  params["backbone"]["layers_0"]["attention"]["query"]["lora_a"])


def test_lora_dropout_only_when_training():
    spec = LoRASpec(rank=2, alpha=8.0, targets=("query", "value"), dropout=0.5)
    model, params = _model_and_params(spec)
    params = _randomize_lora_b(params)
    run = lambda det, seed: np.asarray(model.apply({"params": params}, BATCH, deterministic=det,
                                                   rngs={"dropout": jax.random.key(seed)})["logits"])
    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    assert not np.allclose(run(False, 0), run(False, 1))
