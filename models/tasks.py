"""Task models: a backbone (any family) plus a task head, as one Linen module.

    model = build_task_model(arch_cfg, "seq_cls", num_labels=3, pooling="cls")
    params = nn.unbox(model.init(key, batch)["params"])   # {"backbone": ..., ["head": ...]}
    out = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": key})

Backbones are looked up by the config class name in BACKBONES (imported lazily) and built as
`Backbone(config=arch_cfg, dtype=, lora=, remat=, frozen_prefix=, attention=, scan_layers=)`; they must
implement `backbone(input_ids, attention_mask, token_type_ids=None, segment_ids=None, positions=None,
deterministic=True) -> hidden_BxLxD` and `backbone.vocab_table() -> [V, D]` (the tied LM /
MLM decoder, in the compute dtype).
Kinds with no head params (tied causal_lm, embedding without a pooler) have no "head" key.
"""
from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tenure.models.errors import TenureError
from tenure.models.heads import ClassifierHead, EmbeddingHead, Examples, LmHead, MlmHead, TokenClassifierHead
from tenure.models.layers import ATTENTION_IMPLEMENTATIONS, vocab_logits
from tenure.models.lora import LoRASpec

MASKED_LOGIT = -1e9  # a class the head may not predict here (label_masks): far below any real logit

POOLINGS = ("cls", "mean", "last")
# The model heads a TaskModel builds (each task kind of tenure.engine.tasks.kinds trains one)
HEADS = ("seq_cls", "pair_cls", "token_cls", "regression", "causal_lm", "mlm", "embedding")
# Config class name -> (module, backbone class).
BACKBONES = {
    "BertConfig": ("tenure.models.bert", "BertEncoder"),
    "GPT2Config": ("tenure.models.gpt2", "GPT2Decoder"),
    "LlamaConfig": ("tenure.models.llama", "LlamaDecoder"),
}
# Encoder families: BERT-style MLM head, and a biased sequence classifier (decoders' HF
# *ForSequenceClassification `score` layers have no bias).
ENCODER_FAMILIES = ("BertConfig",)


def backbone_class(arch_cfg) -> type:
    name = type(arch_cfg).__name__
    if name not in BACKBONES:
        raise TenureError(f"model: no backbone registered for {name}; known: {sorted(BACKBONES)}")
    module, cls = BACKBONES[name]
    return getattr(importlib.import_module(module), cls)


def _num_layers(cfg) -> int:
    for field in ("num_layers", "num_hidden_layers", "n_layer"):
        if getattr(cfg, field, None) is not None:
            return int(getattr(cfg, field))
    raise TenureError(f"model: {type(cfg).__name__} has no layer count")


def _dropout_rate(cfg) -> float:
    for field in ("classifier_dropout", "hidden_dropout_prob", "resid_pdrop"):
        value = getattr(cfg, field, None)
        if value is not None:
            return float(value)
    return 0.0


class TaskModel(nn.Module):
    """`__call__(batch, deterministic=True, logits=True) -> dict` with keys by kind:
    logits ([B, C] | [B, L, C] | [B, L, V]); regression adds predictions [B]; a classifier batch
    packed per batch (`example_row` / `example_start` / `segment_ids`) still gives [B, C];
    mlm / causal_lm with logits=False give `vocab` (tenure.models.heads.Vocab: the projection's
    hidden [B, L, D], table [V, D], bias) instead of logits, for the train step's chunked
    cross-entropy (tenure.engine.tasks.losses), which never holds the fp32 [B, L, V] logits at once;
    embedding gives embeddings [B, D], or query_embeddings [B, D] + passage_embeddings [B, P, D]
    when the batch holds query_/passage_ fields."""

    arch_cfg: Any
    kind: str
    num_labels: int = 2
    pooling: str = "cls"
    lora: LoRASpec | None = None
    dtype: Any = jnp.float32
    remat: str = "none"
    frozen_prefix: int = 0
    normalize_embeddings: bool = True
    # Classifier kinds in a multi-task run: row t says which labels task t may predict
    # (selected per example by batch["task_id"]); the others get logit -1e9.
    label_masks: tuple[tuple[bool, ...], ...] | None = None
    attention: str = "einsum"        # einsum | xla | cudnn (tenure.models.layers.MultiHeadAttention)
    scan_layers: bool = False        # backbone layers under jax.lax.scan (tenure.models.layer_scan)

    def setup(self):
        cfg = self.arch_cfg
        self.backbone = backbone_class(cfg)(config=cfg, dtype=self.dtype, lora=self.lora, remat=self.remat,
                                            frozen_prefix=self.frozen_prefix, attention=self.attention,
                                            scan_layers=self.scan_layers)
        init = nn.initializers.normal(getattr(cfg, "initializer_range", 0.02))
        if self.kind in ("seq_cls", "pair_cls", "regression"):
            labels = 1 if self.kind == "regression" else self.num_labels
            self.head = ClassifierHead(labels, self.pooling, bool(getattr(cfg, "pooler", False)),
                                       _dropout_rate(cfg), self.dtype, init,
                                       use_bias=type(cfg).__name__ in ENCODER_FAMILIES)
        elif self.kind == "token_cls":
            self.head = TokenClassifierHead(self.num_labels, _dropout_rate(cfg), self.dtype, init)
        elif self.kind == "mlm":
            self.head = MlmHead(cfg.vocab_size, cfg.hidden_act, cfg.layer_norm_eps, self.dtype, init)
        elif self.kind == "causal_lm":
            self.head = LmHead(cfg.vocab_size, bool(getattr(cfg, "tie_word_embeddings", True)), self.dtype, init)
        else:
            self.head = EmbeddingHead(self.pooling, self.normalize_embeddings, bool(getattr(cfg, "pooler", False)),
                                      self.dtype, init)

    def encode(self, batch, prefix: str = "", deterministic: bool = True):
        """Backbone hidden states of batch[prefix + "input_ids"] (any leading shape, flattened to
        rows): (hidden [N, L, D], attention_mask [N, L]). Use with `apply(..., method="encode")`."""
        flat = lambda a: None if a is None else jnp.reshape(a, (-1, a.shape[-1]))
        mask = flat(batch[f"{prefix}attention_mask"])
        hidden = self.backbone(flat(batch[f"{prefix}input_ids"]), mask,
                               token_type_ids=flat(batch.get(f"{prefix}token_type_ids")),
                               segment_ids=flat(batch.get(f"{prefix}segment_ids")),
                               positions=flat(batch.get(f"{prefix}positions")), deterministic=deterministic)
        return hidden, mask

    def __call__(self, batch: dict, deterministic: bool = True, logits: bool = True) -> dict:
        if self.kind == "embedding":
            return self._embeddings(batch, deterministic)
        hidden_BxLxD, mask_BxL = self.encode(batch, "", deterministic)
        if self.kind in ("seq_cls", "pair_cls", "regression"):
            # A batch packed per batch (tenure.engine.data.batch_packing): hidden is [R, L, D], logits [B, C].
            examples = (Examples(batch["example_row"], batch["example_start"], batch["segment_ids"])
                        if "example_row" in batch else None)
            logits_BxC = self.head(hidden_BxLxD, mask_BxL, deterministic, examples)
            if self.kind == "regression":
                return {"logits": logits_BxC, "predictions": logits_BxC[:, 0]}
            return {"logits": self._mask_labels(logits_BxC, batch)}
        if self.kind == "token_cls":
            return {"logits": self._mask_labels(self.head(hidden_BxLxD, deterministic), batch)}
        vocab = self.head(hidden_BxLxD, self.backbone.vocab_table)
        return {"logits": vocab_logits(*vocab)} if logits else {"vocab": vocab}

    def _mask_labels(self, logits, batch):
        if self.label_masks is None or "task_id" not in batch:
            return logits
        allowed_BxC = jnp.asarray(self.label_masks, bool)[batch["task_id"]]
        if logits.ndim == 3:
            allowed_BxC = allowed_BxC[:, None, :]
        return jnp.where(allowed_BxC, logits, jnp.asarray(MASKED_LOGIT, logits.dtype))

    def _embeddings(self, batch, deterministic):
        embed = lambda prefix: self.head(*self.encode(batch, prefix, deterministic))
        if "query_input_ids" not in batch:
            return {"embeddings": embed("")}
        passages_BPxD = embed("passage_")
        batch_size, num_passages = batch["passage_input_ids"].shape[:2]
        return {"query_embeddings": embed("query_"),
                "passage_embeddings": passages_BPxD.reshape(batch_size, num_passages, -1)}


def build_task_model(arch_cfg, task_kind: str, num_labels: int = 2, pooling: str = "cls",
                     lora: LoRASpec | None = None, dtype: Any = jnp.float32, remat: str = "none",
                     frozen_prefix: int = 0, normalize_embeddings: bool = True,
                     label_masks: tuple[tuple[bool, ...], ...] | None = None,
                     attention: str = "einsum", scan_layers: bool = False) -> TaskModel:
    """Validate the choices (TenureError naming the config key) and build the TaskModel."""
    if task_kind not in HEADS:
        raise TenureError(f"task.kind: {task_kind!r} is not one of {', '.join(HEADS)}")
    if pooling not in POOLINGS:
        raise TenureError(f"task.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    if task_kind == "mlm" and type(arch_cfg).__name__ not in ENCODER_FAMILIES:
        raise TenureError(f"task.kind: mlm needs an encoder (BERT family), got {type(arch_cfg).__name__}")
    if remat not in ("none", "full", "dots"):
        raise TenureError(f"model.remat: {remat!r} is not one of none, full, dots")
    check_attention(attention, dtype)
    num_stages = _num_layers(arch_cfg) + 1
    if not 0 <= frozen_prefix <= num_stages:
        raise TenureError(f"trainable: frozen_prefix={frozen_prefix} is outside 0..{num_stages} "
                          "(stages are embeddings + layers)")
    backbone_class(arch_cfg)
    return TaskModel(arch_cfg, task_kind, num_labels, pooling, lora, dtype, remat, frozen_prefix,
                     normalize_embeddings, label_masks, attention=attention, scan_layers=scan_layers)


def check_attention(attention: str, dtype: Any = jnp.float32) -> None:
    """model.attention is usable here: cuDNN flash attention needs an NVIDIA GPU and a 16-bit
    compute dtype; otherwise one TenureError line instead of a trace-time traceback."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise TenureError(f"model.attention: {attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if attention != "cudnn":
        return
    platforms = sorted({d.platform for d in jax.devices()})
    if "gpu" not in platforms:
        raise TenureError(f"model.attention: cudnn needs an NVIDIA GPU with cuDNN; this JAX runs on "
                          f"{', '.join(platforms)} (use model.attention=xla or einsum)")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise TenureError(f"model.attention: cudnn runs in bfloat16 (or float16) only; model.dtype is {jnp.dtype(dtype).name} "
                          "(set model.dtype=bfloat16, or use model.attention=xla)")


def graft_pretrained(params: dict, backbone: dict, head: dict | None = None) -> dict:
    """Overlay pretrained leaves onto freshly initialised task params (boxed or unboxed).

    Leaves the checkpoint lacks (LoRA adapters, a new classifier) keep their init values;
    checkpoint leaves the model lacks (e.g. an MLM head under seq_cls) are ignored; a shape
    mismatch raises TenureError naming the parameter path."""

    def overlay(node, new, path):
        if isinstance(node, dict):
            return {k: overlay(v, new[k], f"{path}/{k}") if isinstance(new, dict) and k in new else v
                    for k, v in node.items()}
        value = node.unbox() if isinstance(node, nn.meta.AxisMetadata) else node
        if tuple(value.shape) != tuple(new.shape):
            raise TenureError(f"pretrained weights: {path} has shape {tuple(new.shape)}, "
                              f"the model expects {tuple(value.shape)}")
        new = jnp.asarray(new, value.dtype)
        return node.replace_boxed(new) if isinstance(node, nn.meta.AxisMetadata) else new

    out = dict(params)
    out["backbone"] = overlay(params["backbone"], backbone, "backbone")
    if head is not None and "head" in params:
        out["head"] = overlay(params["head"], head, "head")
    return out
