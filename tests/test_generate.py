"""Greedy generation (no KV cache) reproduces HF `generate(do_sample=False)` on the fixtures."""
import json
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from models import hf_gpt2, hf_llama
from models.generate import _greedy_loop, greedy_generate, left_align
from models.gpt2 import GPT2Config, GPT2Decoder
from models.llama import LlamaDecoder
from models.tasks import build_task_model

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
HF_MODULES = {"gpt2": hf_gpt2, "llama": hf_llama, "qwen2": hf_llama, "mistral": hf_llama}
_LOGITS_FNS = {}


def load(family):
    d = FIXTURES / family
    hf = HF_MODULES[family]
    cfg = hf.config_from_hf(json.loads((d / "config.json").read_text()))
    return cfg, hf.params_from_hf(load_file(d / "model.safetensors"), cfg), dict(np.load(d / "reference.npz"))


def logits_fn(cfg):
    """One function object per config, so the compiled decoding loop is reused across calls."""
    if cfg not in _LOGITS_FNS:
        model = (GPT2Decoder if isinstance(cfg, GPT2Config) else LlamaDecoder)(cfg)

        def apply(params, ids, mask, positions):
            hidden = model.apply({"params": params["backbone"]}, ids, mask, positions=positions)
            if params["head"] is None:
                return model.apply({"params": params["backbone"]}, hidden, method="attend")
            return hidden @ params["head"]["lm_head"]["kernel"]

        _LOGITS_FNS[cfg] = apply
    return _LOGITS_FNS[cfg]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(family):
    cfg, params, ref = load(family)
    fn = logits_fn(cfg)
    new = greedy_generate(fn, params, ref["prompt_ids"], ref["prompt_mask"], 6,
                          eos_id=int(ref["generate_eos_id"]), pad_id=int(ref["generate_pad_id"]))
    np.testing.assert_array_equal(new, ref["generated_ids"])
    assert (new == int(ref["generate_eos_id"])).any()  # some row stopped early, then padded


def test_without_eos_every_row_runs_to_the_limit():
    cfg, params, ref = load("mistral")  # sliding window (5) shorter than prompt + new tokens
    free = greedy_generate(logits_fn(cfg), params, ref["prompt_ids"], ref["prompt_mask"], 6, eos_id=None,
                           pad_id=int(ref["generate_pad_id"]))
    np.testing.assert_array_equal(free, ref["free_run_ids"])


def test_right_padded_prompts_and_single_compile():
    cfg, params, ref = load("gpt2")  # learned positions: wrong positions would change the output
    before = _greedy_loop._cache_size()
    ids, mask = ref["prompt_ids"], ref["prompt_mask"]
    order = np.argsort(-mask, axis=1, kind="stable")  # real tokens first = right padding
    right_ids, right_mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)
    assert right_mask[2].tolist() == [1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(left_align(right_ids, right_mask)[0], ids)
    fn = logits_fn(cfg)
    for prompt_ids, prompt_mask in ((right_ids, right_mask), (ids, mask)):
        new = greedy_generate(fn, params, prompt_ids, prompt_mask, 6, eos_id=int(ref["generate_eos_id"]),
                              pad_id=int(ref["generate_pad_id"]))
        np.testing.assert_array_equal(new, ref["generated_ids"])
    assert _greedy_loop._cache_size() - before <= 1


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_through_the_causal_lm_task_model(family):
    """The lead's wiring: TaskModel(causal_lm) with an untied (Llama) or tied (GPT-2) head decodes like HF."""
    cfg, params, ref = load(family)
    model = build_task_model(cfg, "causal_lm")
    task_params = {"backbone": params["backbone"]}
    if params["head"] is not None:
        task_params["head"] = params["head"]

    def apply(p, ids, mask, positions):
        return model.apply({"params": p}, {"input_ids": ids, "attention_mask": mask, "positions": positions})["logits"]

    new = greedy_generate(apply, task_params, ref["prompt_ids"], ref["prompt_mask"], 6,
                          eos_id=int(ref["generate_eos_id"]), pad_id=int(ref["generate_pad_id"]))
    np.testing.assert_array_equal(new, ref["generated_ids"])
    batch = {"input_ids": ref["prompt_ids"], "attention_mask": ref["prompt_mask"]}
    fresh = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])
    assert jax.tree.structure(fresh) == jax.tree.structure(task_params)  # HF import fills every leaf
