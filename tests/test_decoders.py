"""Decoder backbones (GPT-2, Llama, Qwen2, Mistral): parity with HF PyTorch fixtures and the
properties a causal LM must have (causality, padding, packing, GQA, frozen prefix, LoRA, remat).

Relative error, as used throughout: rel(a, b) = max|a - b| / max|b| over real (non-pad) tokens,
with b the HF reference. Fixtures come from scripts/fixtures_decoders.py (fp32, eager attention).
"""
import dataclasses
import json
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from tenure.models.errors import TenureError
from tenure.models import hf_gpt2, hf_llama
from tenure.models.gpt2 import GPT2Config, GPT2Decoder
from tenure.models.llama import LlamaConfig, LlamaDecoder
from tenure.models.lora import LoRASpec, merge_lora
from tenure.models.rope import RopeSpec, inverse_frequencies

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
HF_MODULES = {"gpt2": hf_gpt2, "llama": hf_llama, "qwen2": hf_llama, "mistral": hf_llama}


def load(family):
    d = FIXTURES / family
    hf = HF_MODULES[family]
    cfg = hf.config_from_hf(json.loads((d / "config.json").read_text()))
    params = hf.params_from_hf(load_file(d / "model.safetensors"), cfg)
    return cfg, params, dict(np.load(d / "reference.npz"))


def decoder(cfg, **kw):
    return (GPT2Decoder if isinstance(cfg, GPT2Config) else LlamaDecoder)(cfg, **kw)


@partial(jax.jit, static_argnums=0)
def _run(cfg, params, ids, mask, segment_ids=None, positions=None):
    model = decoder(cfg)
    hidden, inter = model.apply({"params": params["backbone"]}, ids, mask, segment_ids=segment_ids,
                                positions=positions, mutable=["intermediates"])
    if params["head"] is None:
        logits = model.apply({"params": params["backbone"]}, hidden, method="attend")
    else:
        logits = hidden @ params["head"]["lm_head"]["kernel"]
    return logits, hidden, inter["intermediates"]["hidden_states"]


def run(cfg, params, ids, mask, **kw):
    """(logits [B, L, V] through the tied or untied LM head, hidden after the final norm,
    per-stage hidden states [embeddings, layers_0, ...]). Tests reuse the [3, 12] fixture shape
    so the compiled program is shared between them."""
    return jax.tree.map(np.asarray, _run(cfg, params, ids, mask, **kw))


def rel(a, b, real):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b)[real].max() / np.abs(b[real]).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_fixture(family):
    cfg, params, ref = load(family)
    real = ref["attention_mask"].astype(bool)
    logits, hidden, stages = run(cfg, params, ref["input_ids"], ref["attention_mask"])
    # HF hidden_states = (embeddings, layer_0 ... layer_{L-2} outputs, final-norm output).
    for i in range(cfg.num_layers):
        assert rel(stages[i], ref["hidden_states"][i], real) <= 1e-4, f"stage {i}"
    assert rel(hidden, ref["hidden_states"][-1], real) <= 1e-4
    assert rel(logits, ref["logits"], real) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
    cfg, params, ref = load(family)
    ids, mask = ref["input_ids"].copy(), ref["attention_mask"]
    ids[0, 6] = (ids[0, 6] + 1) % cfg.vocab_size
    before, after = ref["logits"][0], run(cfg, params, ids, mask)[0][0]
    np.testing.assert_allclose(after[:6], before[:6], rtol=0, atol=1e-5)
    assert np.abs(after[6:] - before[6:]).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(family):
    """Row 2 of the fixture (5 real tokens) right-padded with other pad ids, and left-padded,
    gives HF's logits for its real tokens."""
    cfg, params, ref = load(family)
    n = int(ref["attention_mask"][2].sum())
    tokens = ref["input_ids"][2, :n]
    ids = np.stack([ref["input_ids"][2], ref["input_ids"][2], ref["input_ids"][2]])
    mask = np.repeat(ref["attention_mask"][2:3], 3, axis=0)
    ids[1, n:] = 7  # pad ids are arbitrary
    ids[2] = np.concatenate([np.full(12 - n, 9), tokens])
    mask[2] = np.concatenate([np.zeros(12 - n), np.ones(n)])
    logits = run(cfg, params, ids, mask)[0]
    expected = ref["logits"][2, :n]
    for got in (logits[0, :n], logits[1, :n], logits[2, 12 - n:]):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("family", ("gpt2", "mistral"))
def test_packed_row_equals_separate_rows(family):
    """Two examples packed in one row (segment ids, positions restarting at 0) give the
    logits each gets alone (also under Mistral's sliding window)."""
    cfg, params, ref = load(family)
    first, second = ref["input_ids"][0, :7], ref["input_ids"][1, :4]
    ids = np.zeros((3, 12), np.int32)
    segments = np.zeros((3, 12), np.int32)
    positions = np.zeros((3, 12), np.int32)
    ids[0, :11], segments[0, :11] = np.concatenate([first, second]), [1] * 7 + [2] * 4
    positions[0, :11] = list(range(7)) + list(range(4))
    ids[1, :7], segments[1, :7], positions[1, :7] = first, 1, np.arange(7)
    ids[2, :4], segments[2, :4], positions[2, :4] = second, 1, np.arange(4)
    logits = run(cfg, params, ids, (segments > 0).astype(np.int32), segment_ids=segments, positions=positions)[0]
    np.testing.assert_allclose(logits[0, :7], logits[1, :7], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits[0, 7:11], logits[2, :4], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits[1, :7], ref["logits"][0, :7], rtol=0, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg, params, ref = load("llama")
    group, dh = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    mha_cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_heads)
    mha = jax.tree.map(lambda x: x, params)
    for i in range(cfg.num_layers):
        attn = mha["backbone"][f"layers_{i}"]["attn"]
        for proj in ("k_proj", "v_proj"):
            kernel = attn[proj]["kernel"]  # query head h reads kv head h // group
            attn[proj] = {"kernel": np.concatenate(
                [kernel[:, (h // group) * dh:(h // group + 1) * dh] for h in range(cfg.num_heads)], axis=1)}
    real = ref["attention_mask"].astype(bool)
    gqa_logits = run(cfg, params, ref["input_ids"], ref["attention_mask"])[0]
    mha_logits = run(mha_cfg, mha, ref["input_ids"], ref["attention_mask"])[0]
    assert rel(mha_logits, gqa_logits, real) <= 1e-6


def test_sliding_window_is_applied():
    cfg, params, ref = load("mistral")
    assert cfg.sliding_window == 5 and all(cfg.is_sliding(i) for i in range(cfg.num_layers))
    real = ref["attention_mask"].astype(bool)
    unwindowed = run(dataclasses.replace(cfg, sliding_window=None), params, ref["input_ids"],
                     ref["attention_mask"])[0]
    assert rel(unwindowed, ref["logits"], real) > 1e-2  # the window matters for 12-token rows


def _loss_and_grads(cfg, backbone, ref, **kw):
    model = decoder(cfg, **kw)
    loss = lambda p: jnp.sum(model.apply({"params": p}, ref["input_ids"], ref["attention_mask"]) ** 2)
    return jax.jit(jax.value_and_grad(loss))(backbone)


def _abs_sum(tree):
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_frozen_prefix_gives_zero_grads(family):
    cfg, params, ref = load(family)
    backbone = jax.tree.map(jnp.asarray, params["backbone"])
    _, grads = _loss_and_grads(cfg, backbone, ref, frozen_prefix=2)  # embeddings, layers_0 forward-only
    assert _abs_sum(grads["embeddings"]) == 0.0 and _abs_sum(grads["layers_0"]) == 0.0
    assert _abs_sum(grads["layers_1"]) > 0 and _abs_sum(grads["final_norm"]) > 0


def test_remat_modes_match_no_remat():
    cfg, params, ref = load("qwen2")
    backbone = jax.tree.map(jnp.asarray, params["backbone"])

    def loss_and_grads(p, mode):
        model = decoder(cfg, remat=mode)
        loss = lambda q: jnp.sum(model.apply({"params": q}, ref["input_ids"], ref["attention_mask"]) ** 2)
        return jax.value_and_grad(loss)(p)

    # One compiled program for the three modes (compiles dominate this test's time).
    results = jax.jit(lambda p: {mode: loss_and_grads(p, mode) for mode in ("none", "full", "dots")})(backbone)
    loss, grads = results["none"]
    assert _abs_sum(grads["embeddings"]) > 0
    for mode in ("full", "dots"):
        remat_loss, remat_grads = results[mode]
        np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
            assert float(jnp.abs(a - b).max() / jnp.abs(a).max()) <= 1e-5, mode


def _adapted(tree, path=()):
    """Paths of Dense modules holding lora_a / lora_b."""
    if not isinstance(tree, dict):
        return []
    here = [path] if "lora_a" in tree and "lora_b" in tree else []
    return here + [p for k, v in tree.items() for p in _adapted(v, path + (k,))]


@pytest.mark.parametrize("family,targets,expected", [
    ("llama", ("q_proj", "down_proj"), {("attn", "q_proj"), ("mlp", "down_proj")}),
    ("gpt2", ("c_attn",), {("attn", "c_attn_q"), ("attn", "c_attn_k"), ("attn", "c_attn_v")}),
    ("gpt2", ("c_proj", "c_fc"), {("attn", "c_proj"), ("mlp", "c_proj"), ("mlp", "c_fc")}),
])
def test_lora_targets_use_hf_projection_names(family, targets, expected):
    cfg, _, ref = load(family)
    model = decoder(cfg, lora=LoRASpec(rank=2, alpha=4.0, targets=targets))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ref["input_ids"], ref["attention_mask"]))
    adapted = _adapted(shapes["params"])
    assert {p[1:] for p in adapted} == expected
    assert {p[0] for p in adapted} == {f"layers_{i}" for i in range(cfg.num_layers)}
    group, name = sorted(expected)[0]
    dense = shapes["params"]["layers_0"][group][name]
    assert dense["lora_a"].shape == (dense["kernel"].shape[0], 2)
    assert dense["lora_b"].shape == (2, dense["kernel"].shape[1])


def test_lora_adapters_equal_their_merged_kernels():
    """Adapters on q/v/up projections compute what the merged model computes (and a zero
    lora_b, the init rule, gives exactly the pretrained model)."""
    cfg, params, ref = load("llama")
    spec = LoRASpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "up_proj"))
    adapted = jax.tree.map(jnp.asarray, params["backbone"])
    for i in range(cfg.num_layers):
        for j, (group, name) in enumerate((("attn", "q_proj"), ("attn", "v_proj"), ("mlp", "up_proj"))):
            d_in, d_out = adapted[f"layers_{i}"][group][name]["kernel"].shape
            key_a, key_b = jax.random.split(jax.random.key(10 * i + j))
            adapted[f"layers_{i}"][group][name].update(lora_a=jax.random.normal(key_a, (d_in, 2)),
                                                       lora_b=0.1 * jax.random.normal(key_b, (2, d_out)))
    real = ref["attention_mask"].astype(bool)
    with_lora = jax.jit(decoder(cfg, lora=spec).apply)({"params": adapted}, ref["input_ids"], ref["attention_mask"])
    merged = run(cfg, {"backbone": merge_lora(adapted, spec), "head": None}, ref["input_ids"],
                 ref["attention_mask"])[1]
    assert rel(with_lora, merged, real) <= 1e-5
    assert rel(with_lora, ref["hidden_states"][-1], real) > 1e-3  # the adapters do change the model


def test_init_param_tree_axes_and_bf16_compute():
    cfg, params, ref = load("qwen2")
    model = decoder(cfg, dtype=jnp.bfloat16)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ref["input_ids"], ref["attention_mask"])["params"]
    axes = nn.get_partition_spec(boxed)
    assert tuple(axes["embeddings"]["token"]) == ("vocab", "embed")
    assert tuple(axes["layers_0"]["attn"]["k_proj"]["kernel"]) == ("embed", "kv_heads")
    assert tuple(axes["layers_1"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["final_norm"]["scale"]) == ("norm",)
    shapes = nn.unbox(boxed)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(
        lambda x: (x.shape, np.dtype(np.float32)), params["backbone"])  # params fp32 even for bf16 compute
    hidden = jax.jit(model.apply)({"params": params["backbone"]}, ref["input_ids"], ref["attention_mask"])
    assert hidden.dtype == jnp.bfloat16
    real = ref["attention_mask"].astype(bool)
    assert rel(hidden.astype(jnp.float32), ref["hidden_states"][-1], real) < 5e-2


def test_rope_config_layouts():
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    old = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}}
    assert RopeSpec.from_hf(new) == RopeSpec.from_hf(old)
    assert RopeSpec.from_hf({"rope_parameters": RopeSpec.from_hf(old).to_hf()}) == RopeSpec.from_hf(old)
    assert RopeSpec.from_hf({"rope_theta": 1e6}) == RopeSpec(theta=1e6)
    with pytest.raises(TenureError, match="rope_parameters.rope_type: 'yarn'"):
        RopeSpec.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    # llama3 scaling: high frequencies kept, low ones divided by factor, the band between interpolated.
    spec = RopeSpec.from_hf(new)
    base, scaled = inverse_frequencies(RopeSpec(theta=500000.0), 128), inverse_frequencies(spec, 128)
    ratio = scaled / base
    assert ratio[0] == 1.0 and np.isclose(ratio[-1], 1 / 8) and np.any((ratio < 1) & (ratio > 1 / 8))


def test_config_errors_qwen2_window_and_length_limit():
    llama = json.loads((FIXTURES / "llama" / "config.json").read_text())
    with pytest.raises(TenureError, match="hidden_act='gelu'"):
        LlamaConfig.from_hf({**llama, "hidden_act": "gelu"})
    with pytest.raises(TenureError, match="model_type 'bert'"):
        LlamaConfig.from_hf({**llama, "model_type": "bert"})
    gpt2 = json.loads((FIXTURES / "gpt2" / "config.json").read_text())
    with pytest.raises(TenureError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Config.from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True})
    qwen2 = json.loads((FIXTURES / "qwen2" / "config.json").read_text())
    del qwen2["layer_types"]
    on = LlamaConfig.from_hf({**qwen2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1})
    assert on.sliding_window == 4 and [on.is_sliding(i) for i in range(2)] == [False, True]
    assert LlamaConfig.from_hf({**qwen2, "sliding_window": 4}).sliding_window is None
    assert LlamaConfig.from_hf({**llama, "head_dim": None}).head_dim == 48 // 4
    too_long = np.ones((1, GPT2Config.from_hf(gpt2).max_positions + 1), np.int32)
    with pytest.raises(TenureError, match="sequence length 65 exceeds the model's n_positions=64"):
        jax.eval_shape(decoder(GPT2Config.from_hf(gpt2)).init, jax.random.key(0), too_long, too_long)


def test_dropout_only_when_not_deterministic():
    cfg, params, ref = load("gpt2")  # embd/attn/resid dropout 0.1 (HF defaults)
    model = decoder(cfg)
    train = jax.jit(lambda key: model.apply({"params": params["backbone"]}, ref["input_ids"], ref["attention_mask"],
                                            deterministic=False, rngs={"dropout": key}))
    a, b, c = (train(jax.random.key(seed)) for seed in (1, 1, 2))
    real = ref["attention_mask"].astype(bool)
    np.testing.assert_array_equal(a, b)  # same key, same masks
    assert rel(a, c, real) > 1e-3 and rel(a, ref["hidden_states"][-1], real) > 1e-3
