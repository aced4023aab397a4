"""HF GPT-2 <-> tenure weight mapping (model_type "gpt2").

Every transpose and skip, stated once:
- HF `Conv1D` weights are stored [in, out], which is already our Dense kernel layout: no transpose.
- `attn.c_attn.weight` [D, 3D] / `.bias` [3D] are split column-wise into c_attn_q/k/v (q, k, v order).
- `wte` [V, D] and `wpe` [P, D] map to embeddings/token and embeddings/position as they are.
- LayerNorm `weight`/`bias` map to `scale`/`bias` (ln_1 -> attn_norm, ln_2 -> mlp_norm, ln_f -> final_norm).
- `lm_head.weight` is tied to `wte` and v5 checkpoints do not store it: skipped on import, not written.
- `attn.bias` / `attn.masked_bias` (causal-mask buffers of old checkpoints) are skipped: the mask
  is built from the input; transformers v5 neither saves nor expects them.
- Heads: `score.weight` [C, D] (sequence classification, no bias) and `classifier.weight/.bias`
  (token classification) are nn.Linear [out, in]: transposed to head/classifier/kernel [D, C].
"""
from __future__ import annotations

import numpy as np

from tenure.models.errors import TenureError
from tenure.models.gpt2 import GPT2Config

_ARCHITECTURES = {
    "causal_lm": "GPT2LMHeadModel", "seq_cls": "GPT2ForSequenceClassification",
    "pair_cls": "GPT2ForSequenceClassification", "regression": "GPT2ForSequenceClassification",
    "token_cls": "GPT2ForTokenClassification", "embedding": "GPT2Model",
}


def architecture(cfg: GPT2Config, task_kind: str) -> str:
    """HF class for a task kind, e.g. GPT2ForSequenceClassification (for config `architectures`)."""
    if task_kind not in _ARCHITECTURES:
        raise TenureError(f"task.kind: {task_kind!r} cannot be exported as a GPT-2 HF model")
    return _ARCHITECTURES[task_kind]


def config_from_hf(d: dict) -> GPT2Config:
    return GPT2Config.from_hf(d)


def config_to_hf(cfg: GPT2Config) -> dict:
    return cfg.to_hf()


def _strip_prefix(tensors: dict) -> dict:
    """Keys of GPT2LMHeadModel / *ForX start with "transformer."; a bare GPT2Model's do not."""
    return {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()}


def _get(tensors: dict, key: str) -> np.ndarray:
    if key not in tensors:
        raise TenureError(f"model.safetensors: missing tensor {key!r} for gpt2")
    return np.asarray(tensors[key], np.float32)


def params_from_hf(tensors: dict, cfg: GPT2Config) -> dict:
    t = _strip_prefix(tensors)
    D = cfg.hidden_size
    backbone = {
        "embeddings": {"token": _get(t, "wte.weight"), "position": _get(t, "wpe.weight")},
        "final_norm": {"scale": _get(t, "ln_f.weight"), "bias": _get(t, "ln_f.bias")},
    }
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        qkv_w, qkv_b = _get(t, p + "attn.c_attn.weight"), _get(t, p + "attn.c_attn.bias")
        attn = {name: {"kernel": qkv_w[:, j * D:(j + 1) * D], "bias": qkv_b[j * D:(j + 1) * D]}
                for j, name in enumerate(("c_attn_q", "c_attn_k", "c_attn_v"))}
        attn["c_proj"] = {"kernel": _get(t, p + "attn.c_proj.weight"), "bias": _get(t, p + "attn.c_proj.bias")}
        backbone[f"layers_{i}"] = {
            "attn_norm": {"scale": _get(t, p + "ln_1.weight"), "bias": _get(t, p + "ln_1.bias")},
            "attn": attn,
            "mlp_norm": {"scale": _get(t, p + "ln_2.weight"), "bias": _get(t, p + "ln_2.bias")},
            "mlp": {"c_fc": {"kernel": _get(t, p + "mlp.c_fc.weight"), "bias": _get(t, p + "mlp.c_fc.bias")},
                    "c_proj": {"kernel": _get(t, p + "mlp.c_proj.weight"),
                               "bias": _get(t, p + "mlp.c_proj.bias")}},
        }
    head = None
    if "score.weight" in t:
        head = {"classifier": {"kernel": _get(t, "score.weight").T}}
    elif "classifier.weight" in t:
        head = {"classifier": {"kernel": _get(t, "classifier.weight").T, "bias": _get(t, "classifier.bias")}}
    elif "lm_head.weight" in tensors and not cfg.tie_word_embeddings:
        head = {"lm_head": {"kernel": _get(tensors, "lm_head.weight").T}}
    return {"backbone": backbone, "head": head}


def params_to_hf(params: dict, cfg: GPT2Config, task_kind: str) -> dict:
    """Tensors named as `architecture(cfg, task_kind)` expects (no LoRA leaves: merge first)."""
    architecture(cfg, task_kind)
    b = to_numpy(params["backbone"])
    prefix = "" if task_kind == "embedding" else "transformer."
    out = {"wte.weight": b["embeddings"]["token"], "wpe.weight": b["embeddings"]["position"],
           "ln_f.weight": b["final_norm"]["scale"], "ln_f.bias": b["final_norm"]["bias"]}
    for i in range(cfg.num_layers):
        layer, p = b[f"layers_{i}"], f"h.{i}."
        attn = layer["attn"]
        qkv = [attn[n] for n in ("c_attn_q", "c_attn_k", "c_attn_v")]
        out[p + "attn.c_attn.weight"] = np.concatenate([d["kernel"] for d in qkv], axis=1)
        out[p + "attn.c_attn.bias"] = np.concatenate([d["bias"] for d in qkv])
        for hf, ours in (("attn.c_proj", attn["c_proj"]), ("mlp.c_fc", layer["mlp"]["c_fc"]),
                         ("mlp.c_proj", layer["mlp"]["c_proj"])):
            out[p + hf + ".weight"], out[p + hf + ".bias"] = ours["kernel"], ours["bias"]
        for hf, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[p + hf + ".weight"], out[p + hf + ".bias"] = layer[norm]["scale"], layer[norm]["bias"]
    out = {prefix + k: v for k, v in out.items()}
    out.update(_head_to_hf(params.get("head"), cfg, task_kind))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _head_to_hf(head: dict | None, cfg: GPT2Config, task_kind: str) -> dict:
    head = to_numpy(head or {})
    if task_kind == "causal_lm":
        if cfg.tie_word_embeddings:
            return {}
        return {"lm_head.weight": head["lm_head"]["kernel"].T}
    if task_kind in ("seq_cls", "pair_cls", "regression"):
        return {"score.weight": bias_free_kernel(head["classifier"], "GPT2ForSequenceClassification").T}
    if task_kind == "token_cls":
        return {"classifier.weight": head["classifier"]["kernel"].T, "classifier.bias": head["classifier"]["bias"]}
    return {}


def bias_free_kernel(dense: dict, hf_class: str) -> np.ndarray:
    """HF's sequence-classification `score` has no bias; refuse to drop a trained one silently."""
    if "bias" in dense and np.any(dense["bias"] != 0):
        raise TenureError(f"export: {hf_class}.score has no bias, but head/classifier/bias is non-zero")
    return dense["kernel"]


def to_numpy(tree):
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)
