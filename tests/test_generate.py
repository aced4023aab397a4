"""Greedy generation: the KV-cache decoder reproduces HF `generate(do_sample=False)` on the
fixtures, and the no-cache reference loop token for token on tiny random models of every family
(left-padded prompts of different lengths, EOS, stop sequences)."""
import functools
import json
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tenure.models import hf_gpt2, hf_llama
from tenure.models.errors import TenureError
from tenure.models.generate import _greedy_loop, greedy_generate, left_align
from tenure.models.gpt2 import GPT2Config
from tenure.models.llama import LlamaConfig
from tenure.models.tasks import build_task_model

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
HF_MODULES = {"gpt2": hf_gpt2, "llama": hf_llama, "qwen2": hf_llama, "mistral": hf_llama}


def load(family):
    """(causal_lm TaskModel, its params from the HF fixture, the fixture's reference arrays)."""
    d = FIXTURES / family
    hf = HF_MODULES[family]
    cfg = hf.config_from_hf(json.loads((d / "config.json").read_text()))
    params = hf.params_from_hf(load_file(d / "model.safetensors"), cfg)
    task_params = {"backbone": params["backbone"]}
    if params["head"] is not None:  # untied LM head (Llama fixtures); GPT-2 ties it
        task_params["head"] = params["head"]
    return build_task_model(cfg, "causal_lm"), task_params, dict(np.load(d / "reference.npz"))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(family):
    model, params, ref = load(family)
    new = greedy_generate(model, params, ref["prompt_ids"], ref["prompt_mask"], 6,
                          eos_id=int(ref["generate_eos_id"]), pad_id=int(ref["generate_pad_id"]))
    np.testing.assert_array_equal(new, ref["generated_ids"])
    assert (new == int(ref["generate_eos_id"])).any()  # some row stopped early, then padded
    batch = {"input_ids": ref["prompt_ids"], "attention_mask": ref["prompt_mask"]}
    fresh = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])
    assert jax.tree.structure(fresh) == jax.tree.structure(params)  # HF import fills every leaf


def test_without_eos_every_row_runs_to_the_limit():
    model, params, ref = load("mistral")  # sliding window (5) shorter than prompt + new tokens
    free = greedy_generate(model, params, ref["prompt_ids"], ref["prompt_mask"], 6, eos_id=None,
                           pad_id=int(ref["generate_pad_id"]))
    np.testing.assert_array_equal(free, ref["free_run_ids"])


def test_right_padded_prompts_and_single_compile():
    model, params, ref = load("gpt2")  # learned positions: wrong positions would change the output
    before = _greedy_loop._cache_size()
    ids, mask = ref["prompt_ids"], ref["prompt_mask"]
    order = np.argsort(-mask, axis=1, kind="stable")  # real tokens first = right padding
    right_ids, right_mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)
    assert right_mask[2].tolist() == [1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(left_align(right_ids, right_mask)[0], ids)
    for prompt_ids, prompt_mask in ((right_ids, right_mask), (ids, mask)):
        new = greedy_generate(model, params, prompt_ids, prompt_mask, 6, eos_id=int(ref["generate_eos_id"]),
                              pad_id=int(ref["generate_pad_id"]))
        np.testing.assert_array_equal(new, ref["generated_ids"])
    assert _greedy_loop._cache_size() - before <= 1


# Tiny random models, one per case the cache must get right. Their weights have stddev 0.5 (not
# a fresh model's 0.02) so that the next-token distributions are peaked: the two paths' float
# rounding then cannot flip an argmax, and the tokens vary along a row.
RANDOM = {
    "gpt2": GPT2Config(vocab_size=61, max_positions=40, hidden_size=16, num_layers=2, num_heads=2),
    "llama": LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                         num_kv_heads=2, head_dim=8),
    "qwen2_bias_gqa": LlamaConfig(model_type="qwen2", vocab_size=61, hidden_size=16, intermediate_size=24,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, qkv_bias=True,
                                  tie_word_embeddings=True),
    "mistral_window": LlamaConfig(model_type="mistral", vocab_size=61, hidden_size=16, intermediate_size=24,
                                  num_layers=2, num_heads=4, num_kv_heads=1, head_dim=4, sliding_window=4,
                                  layer_types=("sliding_attention",) * 2),
}
PROMPT_LENGTHS = (9, 4, 1, 7)   # left-padded to 9
NEW_TOKENS = 10


@functools.cache
def random_case(name):
    cfg = RANDOM[name]
    model = build_task_model(cfg, "causal_lm")
    rng = np.random.default_rng(0)
    width = max(PROMPT_LENGTHS)
    ids = np.zeros((len(PROMPT_LENGTHS), width), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, width - length:] = rng.integers(1, cfg.vocab_size, length)
        mask[row, width - length:] = 1
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), {"input_ids": ids, "attention_mask": mask}))
    # Drawn in numpy (compiling the init costs more than a test): norm scales near 1, the rest N(0, 0.5).
    draw = lambda path, leaf: (np.float32(1.0 + 0.1 * rng.standard_normal(leaf.shape)) if path[-1].key == "scale"
                               else np.float32(0.5 * rng.standard_normal(leaf.shape)))
    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    return model, params, ids, mask


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_cache_matches_the_no_cache_loop(name):
    model, params, ids, mask = random_case(name)
    cached = greedy_generate(model, params, ids, mask, NEW_TOKENS, eos_id=None)
    reference = greedy_generate(model, params, ids, mask, NEW_TOKENS, eos_id=None, use_cache=False)
    np.testing.assert_array_equal(cached, reference)
    assert len(np.unique(cached)) >= 8 and len({tuple(row) for row in cached.tolist()}) == len(cached)  # varied


def test_decode_hidden_states_equal_the_full_forward():
    """Prefill + one token at a time through `decode` gives the hidden states of one forward over the
    whole left-padded sequence at every real position (window 4 < 9 + 5 tokens)."""
    model, params, ids, mask = random_case("mistral_window")
    backbone = lambda method, *args: model.apply({"params": params}, *args,
                                                 method=lambda m, *a: getattr(m.backbone, method)(*a))
    extra = np.random.default_rng(3).integers(1, 61, (len(ids), 5)).astype(np.int32)
    full_ids, full_mask = np.concatenate([ids, extra], 1), np.concatenate([mask, np.ones_like(extra)], 1)
    expected = np.asarray(jax.jit(partial(backbone, "__call__"))(full_ids, full_mask))
    decode = jax.jit(partial(backbone, "decode"))
    hidden, cache = decode(ids, mask, backbone("init_cache", len(ids), full_ids.shape[1]))
    steps = [hidden]
    for t in range(extra.shape[1]):
        hidden, cache = decode(extra[:, t:t + 1], np.ones_like(extra[:, :1]), cache)
        steps.append(hidden)
    got = np.concatenate(steps, axis=1)
    real = full_mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == full_ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.mask_BxT), full_mask)


def test_scanned_and_remat_models_decode_alike():
    model, params, ids, mask = random_case("qwen2_bias_gqa")
    plain = greedy_generate(model, params, ids, mask, NEW_TOKENS, eos_id=None)
    scanned = build_task_model(RANDOM["qwen2_bias_gqa"], "causal_lm", scan_layers=True, remat="full")
    np.testing.assert_array_equal(greedy_generate(scanned, params, ids, mask, NEW_TOKENS, eos_id=None), plain)


def ended_rows(free, eos_ids=(), stop_sequences=(), pad=0):
    """The rule, applied to a free run: a row ends at its first EOS or completed stop sequence
    (generated tokens only), the rest is pad. -> (rows, each row's length)."""
    out, lengths = np.full_like(free, pad), []
    for r, row in enumerate(free.tolist()):
        for t, token in enumerate(row):
            out[r, t] = token
            if token in eos_ids or any(tuple(row[max(t + 1 - len(s), 0):t + 1]) == tuple(s) for s in stop_sequences):
                break
        lengths.append(t + 1)
    return out, lengths


@pytest.mark.parametrize("name", ("gpt2", "mistral_window"))
def test_eos_and_stop_sequences(name):
    model, params, ids, mask = random_case(name)
    free = greedy_generate(model, params, ids, mask, NEW_TOKENS, eos_id=None)
    rows = free.tolist()
    pairs = lambda row: {tuple(row[t:t + 2]) for t in range(len(row) - 1)}
    # Row 2 must run on: the EOS ids (from rows 0 and 3) and the stop pair (from row 1) never occur
    # in it, nor does its "last prompt token, first new token" pair, a stop sequence that would end
    # it at once if the prompt counted. The last stop sequence is longer than the new tokens.
    first_eos = next(x for x in rows[0][1:] if x not in rows[2])
    eos_ids = (first_eos, next(x for x in rows[3][1:] if x not in rows[2] + [first_eos]))
    stop_pair = next(p for p in (tuple(rows[1][t:t + 2]) for t in range(NEW_TOKENS - 1)) if p not in pairs(rows[2]))
    across = (int(ids[2, -1]), rows[2][0])
    assert across not in pairs(rows[2])
    stops = (stop_pair, across, tuple(range(1, NEW_TOKENS + 2)))
    pad = 60
    expected, lengths = ended_rows(free, eos_ids, stops, pad)
    assert lengths[2] == NEW_TOKENS and max(lengths[:2] + lengths[3:]) < NEW_TOKENS
    assert not np.array_equal(expected, ended_rows(free, eos_ids, (), pad)[0])    # the stop sequences
    assert not np.array_equal(expected, ended_rows(free, (), stops, pad)[0])      # and the EOS ids end rows
    for use_cache in (True, False):
        new = greedy_generate(model, params, ids, mask, NEW_TOKENS, eos_id=eos_ids, pad_id=pad,
                              stop_sequences=stops, use_cache=use_cache)
        np.testing.assert_array_equal(new, expected)
    eos_only = greedy_generate(model, params, ids, mask, NEW_TOKENS, eos_id=eos_ids[0])
    np.testing.assert_array_equal(eos_only, ended_rows(free, eos_ids[:1], pad=eos_ids[0])[0])


def test_generation_past_gpt2_positions_is_refused():
    model, params, ids, mask = random_case("gpt2")
    with pytest.raises(TenureError, match="n_positions=40"):
        greedy_generate(model, params, ids, mask, 40 - ids.shape[1] + 2, eos_id=None)
