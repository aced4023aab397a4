"""HF weight/config mapping for the decoder families: import -> export -> import is bit-identical,
exports load in transformers (torch env) with no missing/unexpected keys, heads map both ways."""
import json
import os
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tenure.models.errors import TenureError
from tenure.models import hf_gpt2, hf_llama
from tenure.models.gpt2 import GPT2Config, GPT2Decoder
from tenure.models.llama import LlamaDecoder

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TORCH_PYTHON = ROOT / ".torch-venv" / "bin" / "python"
FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
HF_MODULES = {"gpt2": hf_gpt2, "llama": hf_llama, "qwen2": hf_llama, "mistral": hf_llama}


def fixture(family):
    d = FIXTURES / family
    return HF_MODULES[family], json.loads((d / "config.json").read_text()), load_file(d / "model.safetensors")


def assert_trees_equal(a, b, path="params"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            assert_trees_equal(a[k], b[k], f"{path}/{k}")
    elif a is None:
        assert b is None, path
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(family):
    hf, config, tensors = fixture(family)
    cfg = hf.config_from_hf(config)
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    params = hf.params_from_hf(tensors, cfg)
    exported = hf.params_to_hf(params, cfg, "causal_lm")
    assert sorted(exported) == sorted(tensors)
    for key, value in tensors.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    assert_trees_equal(hf.params_from_hf(exported, cfg), params)


def test_llama_attention_bias_covers_q_k_v_and_o():
    hf, config, tensors = fixture("llama")
    cfg = hf.config_from_hf({**config, "attention_bias": True})
    assert cfg.qkv_bias and cfg.o_bias
    biased = dict(tensors)
    for i in range(cfg.num_layers):
        for proj, width in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 48)):
            biased[f"model.layers.{i}.self_attn.{proj}.bias"] = np.full(width, i + 0.5, np.float32)
    params = hf.params_from_hf(biased, cfg)
    np.testing.assert_array_equal(params["backbone"]["layers_1"]["attn"]["o_proj"]["bias"], np.full(48, 1.5))
    assert sorted(hf.params_to_hf(params, cfg, "causal_lm")) == sorted(biased)
    assert hf.config_to_hf(cfg)["attention_bias"] is True


def test_untied_and_tied_heads():
    hf, config, tensors = fixture("llama")
    params = hf.params_from_hf(tensors, hf.config_from_hf(config))
    assert params["head"]["lm_head"]["kernel"].shape == (48, 320)  # [D, V]: lm_head.weight transposed
    np.testing.assert_array_equal(params["head"]["lm_head"]["kernel"], tensors["lm_head.weight"].T)
    hf, config, tensors = fixture("qwen2")
    assert hf.params_from_hf(tensors, hf.config_from_hf(config))["head"] is None
    assert "lm_head.weight" not in tensors


@pytest.mark.parametrize("family", ("gpt2", "qwen2"))
def test_task_heads_export_and_import(family):
    hf, config, tensors = fixture(family)
    cfg = hf.config_from_hf(config)
    params = hf.params_from_hf(tensors, cfg)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(cfg.hidden_size, 3)).astype(np.float32)
    seq = dict(params, head={"classifier": {"kernel": kernel, "bias": np.zeros(3, np.float32)}})
    out = hf.params_to_hf(seq, cfg, "seq_cls")
    np.testing.assert_array_equal(out["score.weight"], kernel.T)
    assert np.array_equal(hf.params_from_hf(out, cfg)["head"]["classifier"]["kernel"], kernel)
    seq["head"]["classifier"]["bias"] = np.ones(3, np.float32)
    with pytest.raises(TenureError, match="score has no bias, but head/classifier/bias is non-zero"):
        hf.params_to_hf(seq, cfg, "seq_cls")
    tok = dict(params, head={"classifier": {"kernel": kernel, "bias": np.arange(3, dtype=np.float32)}})
    out = hf.params_to_hf(tok, cfg, "token_cls")
    name = "classifier" if family == "gpt2" else "score"
    np.testing.assert_array_equal(out[f"{name}.bias"], [0, 1, 2])
    assert_trees_equal(hf.params_from_hf(out, cfg)["head"], tok["head"])
    bare = hf.params_to_hf(params, cfg, "embedding")  # the bare HF *Model: no prefix, no head
    assert not any(k.startswith(("transformer.", "model.", "lm_head", "score")) for k in bare)
    assert_trees_equal(hf.params_from_hf(bare, cfg)["backbone"], params["backbone"])
    assert hf.architecture(cfg, "seq_cls").endswith("ForSequenceClassification")


def test_import_errors_name_the_tensor_and_old_buffers_are_skipped():
    hf, config, tensors = fixture("gpt2")
    cfg = hf.config_from_hf(config)
    old = dict(tensors)
    old["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # pre-v5 mask buffer
    old["transformer.h.0.attn.masked_bias"] = np.float32(-1e4)
    assert_trees_equal(hf.params_from_hf(old, cfg), hf.params_from_hf(tensors, cfg))
    del old["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(TenureError, match="missing tensor 'h.1.mlp.c_fc.bias'"):
        hf.params_from_hf(old, cfg)
    hf, config, tensors = fixture("mistral")
    tensors.pop("model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(TenureError, match="'layers.0.self_attn.k_proj.weight'"):
        hf.params_from_hf(tensors, hf.config_from_hf(config))


@pytest.mark.slow
@pytest.mark.skipif(not TORCH_PYTHON.exists(), reason="no .torch-venv (torch + transformers) to load exports in")
def test_exports_load_in_transformers(tmp_path):
    """Export each family (weights perturbed, so nothing is copied through by accident); the torch
    env loads it with no missing/unexpected keys and reproduces our logits on the fixture batch."""
    dirs = []
    for family in FAMILIES:
        hf, config, tensors = fixture(family)
        cfg = hf.config_from_hf(config)
        params = hf.params_from_hf(tensors, cfg)
        params["backbone"]["final_norm"]["scale"] = params["backbone"]["final_norm"]["scale"] * 1.5
        out = tmp_path / family
        out.mkdir()
        save_file(hf.params_to_hf(params, cfg, "causal_lm"), str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(hf.config_to_hf(cfg)))
        ref = dict(np.load(FIXTURES / family / "reference.npz"))
        ref["logits"] = _engine_logits(cfg, params, ref)
        np.savez(out / "reference.npz", **ref)
        dirs.append(str(out))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([str(TORCH_PYTHON), str(ROOT / "scripts" / "fixtures_decoders.py"), "check", *dirs],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["model_class"] for r in reports] == [
        "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"]
    for family, report in zip(FAMILIES, reports):
        assert report["missing_keys"] == report["unexpected_keys"] == report["mismatched_keys"] == [], family
        assert report["logits_rel_err"] <= 1e-5, (family, report)


def _engine_logits(cfg, params, ref):
    model = (GPT2Decoder if isinstance(cfg, GPT2Config) else LlamaDecoder)(cfg)
    hidden = jax.jit(model.apply)({"params": params["backbone"]}, ref["input_ids"], ref["attention_mask"])
    if params["head"] is None:
        return np.asarray(model.apply({"params": params["backbone"]}, hidden, method="attend"))
    return np.asarray(hidden @ params["head"]["lm_head"]["kernel"])
