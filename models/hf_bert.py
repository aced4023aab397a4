"""HF <-> tenure mapping for the BERT family (model_type "bert", "roberta").

Family interface (shared with hf_gpt2 / hf_llama, dispatched by tenure.models.hf):
  config_from_hf(d) -> BertConfig;  config_to_hf(cfg) -> dict
  params_from_hf(tensors, cfg) -> (backbone_params, head_params_or_None)
  params_to_hf(params, cfg, task_kind) -> {hf_name: array}; `params` is the task tree
      {"backbone": ..., ["head": ...]}
  ARCHITECTURES: task kind -> HF class name written to config.json
torch Linear weights are [out, in]; our kernels are [in, out], hence the transposes.
"""
from __future__ import annotations

import numpy as np

from tenure.models.errors import TenureError
from tenure.models.bert import BertConfig

ARCHITECTURES = {"seq_cls": "ForSequenceClassification", "pair_cls": "ForSequenceClassification",
                 "regression": "ForSequenceClassification", "token_cls": "ForTokenClassification",
                 "mlm": "ForMaskedLM", "embedding": "Model"}
_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta"}


def config_from_hf(d: dict) -> BertConfig:
    return BertConfig.from_hf(d)


def config_to_hf(cfg: BertConfig) -> dict:
    return cfg.to_hf()


def architecture(cfg: BertConfig, task_kind: str) -> str:
    if task_kind not in ARCHITECTURES:
        raise TenureError(f"task.kind: {task_kind!r} cannot be exported for a {cfg.model_type} model")
    return _CLASS_PREFIX.get(cfg.model_type, "Bert") + ARCHITECTURES[task_kind]


def _dense(hf: str, ours: tuple[str, ...]):
    return [(f"{hf}.weight", ours + ("kernel",), True), (f"{hf}.bias", ours + ("bias",), False)]


def _norm(hf: str, ours: tuple[str, ...]):
    return [(f"{hf}.weight", ours + ("scale",), False), (f"{hf}.bias", ours + ("bias",), False)]


def backbone_table(cfg: BertConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF name without model prefix, our path under "backbone", transpose?)."""
    table = [(f"embeddings.{n}.weight", ("embeddings", n, "embedding"), False)
             for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    table += _norm("embeddings.LayerNorm", ("embeddings", "norm"))
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", (f"layers_{i}",)
        for name in ("query", "key", "value"):
            table += _dense(f"{hf}.attention.self.{name}", ours + ("attention", name))
        table += _dense(f"{hf}.attention.output.dense", ours + ("attention", "attn_out"))
        table += _norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_norm",))
        table += _dense(f"{hf}.intermediate.dense", ours + ("mlp", "intermediate"))
        table += _dense(f"{hf}.output.dense", ours + ("mlp", "output"))
        table += _norm(f"{hf}.output.LayerNorm", ours + ("mlp_norm",))
    return table


def head_table(cfg: BertConfig, task_kind: str | None) -> list[tuple[str, tuple[str, ...], bool]]:
    """Head names (without the model prefix) that the HF class for task_kind saves;
    task_kind None: every head name we can read (first match wins)."""
    pooler = _dense("pooler.dense", ("pooler", "dense"))
    classifier = _dense("classifier", ("classifier",))
    if cfg.model_type == "bert":
        seq_cls = pooler + classifier
        mlm = (_dense("cls.predictions.transform.dense", ("transform",))
               + _norm("cls.predictions.transform.LayerNorm", ("transform_norm",))
               + [("cls.predictions.bias", ("bias",), False)])
    else:  # RobertaClassificationHead = our pooler (dense + tanh), then the classifier
        seq_cls = _dense("classifier.dense", ("pooler", "dense")) + _dense("classifier.out_proj", ("classifier",))
        mlm = (_dense("lm_head.dense", ("transform",)) + _norm("lm_head.layer_norm", ("transform_norm",))
               + [("lm_head.bias", ("bias",), False)])
    if task_kind is None:
        return pooler + seq_cls + classifier + mlm
    return {"seq_cls": seq_cls, "pair_cls": seq_cls, "regression": seq_cls, "token_cls": classifier,
            "mlm": mlm, "embedding": pooler}[task_kind]


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def params_from_hf(tensors: dict, cfg: BertConfig):
    """Backbone params and any head params (pooler, classifier, MLM head) the checkpoint has."""
    prefix = cfg.model_type + "."
    tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    backbone: dict = {}
    for hf, ours, transpose in backbone_table(cfg):
        if hf not in tensors:
            raise TenureError(f"model weights: tensor {hf!r} is missing (a {cfg.model_type} checkpoint needs it)")
        value = np.asarray(tensors[hf])
        _put(backbone, ours, value.T if transpose else value)
    head: dict = {}
    for hf, ours, transpose in head_table(cfg, None):
        if hf in tensors and _get(head, ours) is None:
            value = np.asarray(tensors[hf])
            _put(head, ours, value.T if transpose else value)
    return backbone, (head or None)


def params_to_hf(params: dict, cfg: BertConfig, task_kind: str) -> dict:
    """HF tensors (numpy, [out, in] Linear weights) for the class `architecture(cfg, task_kind)`."""
    arch = architecture(cfg, task_kind)
    # A bare *Model has no prefix; task classes nest it under e.g. "bert." (pooler included).
    prefix = "" if task_kind == "embedding" else cfg.model_type + "."
    out = {}
    for hf, ours, transpose in backbone_table(cfg):
        value = np.asarray(_get(params["backbone"], ours))
        out[prefix + hf] = np.ascontiguousarray(value.T if transpose else value)
    for hf, ours, transpose in head_table(cfg, task_kind):
        value = _get(params.get("head", {}), ours)
        if value is None:
            raise TenureError(f"export: head parameter {'/'.join(ours)} is missing; HF {arch} needs {hf!r}")
        name = prefix + hf if hf.startswith("pooler.") else hf
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out
