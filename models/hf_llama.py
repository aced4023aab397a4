"""HF Llama / Qwen2 / Mistral <-> tenure weight mapping (model_type llama, qwen2, mistral).

Every transpose and skip, stated once:
- nn.Linear weights are [out, in]; our Dense kernels are [in, out]: every projection
  (q/k/v/o_proj, gate/up/down_proj, lm_head, score) is transposed, both ways. Biases as they are.
- q/k/v columns stay head-major ([H * Dh] with head h at h*Dh..(h+1)*Dh), as HF's view() reads
  them; HF checkpoints already use the rotate-half RoPE layout our apply_rope uses: no permutation.
- `embed_tokens.weight` [V, D] -> embeddings/token as it is; RMSNorm `weight` -> `scale`
  (input_layernorm -> attn_norm, post_attention_layernorm -> mlp_norm, norm -> final_norm).
- `lm_head.weight` is skipped on import when tie_word_embeddings (it is the embedding) and not
  written on export; otherwise it is head/lm_head/kernel (transposed).
- `rotary_emb.inv_freq` (a buffer in old checkpoints) is skipped: recomputed from rope_parameters.
- Heads: `score.weight` [C, D] (sequence classification, no bias) and `score.weight/.bias`
  (token classification) map to head/classifier (transposed).
"""
from __future__ import annotations

import numpy as np

from tenure.models.errors import TenureError
from tenure.models.hf_gpt2 import bias_free_kernel, to_numpy
from tenure.models.llama import LlamaConfig

_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_SUFFIX = {"causal_lm": "ForCausalLM", "seq_cls": "ForSequenceClassification",
           "pair_cls": "ForSequenceClassification", "regression": "ForSequenceClassification",
           "token_cls": "ForTokenClassification", "embedding": "Model"}
_PROJECTIONS = (("self_attn", "attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", "mlp", ("gate_proj", "up_proj", "down_proj")))
_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))


def architecture(cfg: LlamaConfig, task_kind: str) -> str:
    """HF class for this family and task kind, e.g. Qwen2ForSequenceClassification."""
    if task_kind not in _SUFFIX:
        raise TenureError(f"task.kind: {task_kind!r} cannot be exported as a {cfg.model_type} HF model")
    return _PREFIX[cfg.model_type] + _SUFFIX[task_kind]


def config_from_hf(d: dict) -> LlamaConfig:
    return LlamaConfig.from_hf(d)


def config_to_hf(cfg: LlamaConfig) -> dict:
    return cfg.to_hf()


def _strip_prefix(tensors: dict) -> dict:
    """Keys of *ForCausalLM / *ForX start with "model."; a bare *Model's do not."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()}


def _get(tensors: dict, key: str) -> np.ndarray:
    if key not in tensors:
        raise TenureError(f"model.safetensors: missing tensor {key!r} for a Llama-family model")
    return np.asarray(tensors[key], np.float32)


def _has_bias(cfg: LlamaConfig, proj: str) -> bool:
    return (proj in ("q_proj", "k_proj", "v_proj") and cfg.qkv_bias) or (proj == "o_proj" and cfg.o_bias)


def params_from_hf(tensors: dict, cfg: LlamaConfig) -> dict:
    t = _strip_prefix(tensors)
    backbone = {"embeddings": {"token": _get(t, "embed_tokens.weight")},
                "final_norm": {"scale": _get(t, "norm.weight")}}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        layer = {ours: {"scale": _get(t, f"{p}{hf}.weight")} for hf, ours in _NORMS}
        for hf_group, group, projs in _PROJECTIONS:
            layer[group] = {}
            for proj in projs:
                dense = {"kernel": _get(t, f"{p}{hf_group}.{proj}.weight").T}
                if _has_bias(cfg, proj):
                    dense["bias"] = _get(t, f"{p}{hf_group}.{proj}.bias")
                layer[group][proj] = dense
        backbone[f"layers_{i}"] = layer
    head = None
    if "score.weight" in t:
        head = {"classifier": {"kernel": _get(t, "score.weight").T}}
        if "score.bias" in t:
            head["classifier"]["bias"] = _get(t, "score.bias")
    elif "lm_head.weight" in tensors and not cfg.tie_word_embeddings:
        head = {"lm_head": {"kernel": _get(tensors, "lm_head.weight").T}}
    return {"backbone": backbone, "head": head}


def params_to_hf(params: dict, cfg: LlamaConfig, task_kind: str) -> dict:
    """Tensors named as `architecture(cfg, task_kind)` expects (no LoRA leaves: merge first)."""
    hf_class = architecture(cfg, task_kind)
    b = to_numpy(params["backbone"])
    out = {"embed_tokens.weight": b["embeddings"]["token"], "norm.weight": b["final_norm"]["scale"]}
    for i in range(cfg.num_layers):
        layer, p = b[f"layers_{i}"], f"layers.{i}."
        for hf, ours in _NORMS:
            out[f"{p}{hf}.weight"] = layer[ours]["scale"]
        for hf_group, group, projs in _PROJECTIONS:
            for proj in projs:
                out[f"{p}{hf_group}.{proj}.weight"] = layer[group][proj]["kernel"].T
                if _has_bias(cfg, proj):
                    out[f"{p}{hf_group}.{proj}.bias"] = layer[group][proj]["bias"]
    prefix = "" if task_kind == "embedding" else "model."
    out = {prefix + k: v for k, v in out.items()}
    head = to_numpy(params.get("head") or {})
    if task_kind == "causal_lm" and not cfg.tie_word_embeddings:
        out["lm_head.weight"] = head["lm_head"]["kernel"].T
    elif task_kind in ("seq_cls", "pair_cls", "regression"):
        out["score.weight"] = bias_free_kernel(head["classifier"], hf_class).T
    elif task_kind == "token_cls":
        out["score.weight"] = head["classifier"]["kernel"].T
        out["score.bias"] = head["classifier"]["bias"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
