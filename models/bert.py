"""BERT-family encoder backbone (BERT, MiniLM, RoBERTa-style positions), post-LayerNorm.

Param tree: {"embeddings": {"word_embeddings", "position_embeddings", "token_type_embeddings",
"norm"}, "layers_{i}": {"attention": {"query", "key", "value", "attn_out"}, "attention_norm",
"mlp": {"intermediate", "output"}, "mlp_norm"}}. LoRA targets are these Dense names.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tenure.models import layers
from tenure.models.layer_scan import dropout_key_of, layer_ranges, scan_layers, stack_layer_params
from tenure.models.layers import Dropout, LayerNorm, Mlp, MultiHeadAttention, layer_boundary, remat_module, vocab_logits
from tenure.models.lora import LoRASpec


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT-style encoder (field names follow HF `BertConfig`)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # RoBERTa numbers positions from pad_token_id + 1 (0 for BERT).
    position_offset: int = 0
    model_type: str = "bert"
    # Whether a pooler (dense + tanh on [CLS]) exists; "cls" pooling uses it when True.
    pooler: bool = True

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        model_type = d.get("model_type", "bert")
        if d.get("position_embedding_type", "absolute") != "absolute":
            from tenure.models.errors import TenureError
            raise TenureError(f"config.json: position_embedding_type={d['position_embedding_type']!r} "
                              "is not supported (only 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)} - {"position_offset", "model_type", "pooler"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        offset = kwargs.get("pad_token_id", 1) + 1 if model_type in ("roberta", "xlm-roberta") else 0
        return cls(**kwargs, position_offset=offset, model_type=model_type)

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("position_offset", "pooler")}
        d["position_embedding_type"] = "absolute"
        return d


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        embed = lambda n, axes: nn.Embed(n, cfg.hidden_size, dtype=self.dtype,
                                         embedding_init=nn.with_logical_partitioning(init, axes))
        self.word_embeddings = embed(cfg.vocab_size, ("vocab", "embed"))
        self.position_embeddings = embed(cfg.max_position_embeddings, ("position", "embed"))
        self.token_type_embeddings = embed(cfg.type_vocab_size, (None, "embed"))
        self.norm = LayerNorm(cfg.layer_norm_eps, self.dtype)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids_BxL, token_type_ids_BxL, positions_BxL, deterministic=True):
        x_BxLxD = (self.word_embeddings(input_ids_BxL) + self.position_embeddings(positions_BxL)
                   + self.token_type_embeddings(token_type_ids_BxL))
        return self.dropout(self.norm(x_BxLxD), deterministic=deterministic)

    def vocab_table(self):
        return self.word_embeddings.embedding.astype(self.dtype)


class BertLayer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    config: BertConfig
    dtype: Any = jnp.float32
    lora: LoRASpec | None = None
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x_BxLxD, mask_Bx1xLxL, deterministic=True):
        cfg = self.config
        kernel_init = nn.initializers.normal(cfg.initializer_range)
        attn_BxLxD = MultiHeadAttention(
            cfg.num_attention_heads, cfg.head_dim, dropout_rate=cfg.attention_probs_dropout_prob,
            dtype=self.dtype, kernel_init=kernel_init, lora=self.lora,
            names=("query", "key", "value", "attn_out"), attention=self.attention,
            name="attention")(x_BxLxD, mask_Bx1xLxL, None, deterministic)
        attn_BxLxD = Dropout(cfg.hidden_dropout_prob)(attn_BxLxD, deterministic=deterministic)
        x_BxLxD = LayerNorm(cfg.layer_norm_eps, self.dtype, name="attention_norm")(x_BxLxD + attn_BxLxD)
        mlp_BxLxD = Mlp(cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype, kernel_init=kernel_init,
                        lora=self.lora, names=("intermediate", "output"), name="mlp")(x_BxLxD, deterministic)
        mlp_BxLxD = Dropout(cfg.hidden_dropout_prob)(mlp_BxLxD, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="mlp_norm")(x_BxLxD + mlp_BxLxD)


def bert_positions(attention_mask_BxL, offset: int):
    """Position ids when the batch gives none: 0..L-1 (BERT), or RoBERTa's
    pad_token_id + 1 + index of the real token, pad positions = pad_token_id."""
    length = attention_mask_BxL.shape[1]
    if offset == 0:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), attention_mask_BxL.shape)
    mask = attention_mask_BxL.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + (offset - 1)


class BertEncoder(nn.Module):
    """Backbone: (input_ids, attention_mask, token_type_ids, segment_ids, positions) -> hidden [B, L, D].

    frozen_prefix: leading stages ([embeddings, layers_0, ...]) run forward-only.
    remat: "none" | "full" | "dots" (nn.remat of each layer).
    attention: "einsum" | "xla" | "cudnn" (tenure.models.layers.MultiHeadAttention).
    scan_layers: run the layers under jax.lax.scan (tenure.models.layer_scan), same params and outputs.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    lora: LoRASpec | None = None
    remat: str = "none"
    frozen_prefix: int = 0
    attention: str = "einsum"
    scan_layers: bool = False

    def setup(self):
        layer_cls = remat_module(BertLayer, self.remat, static_argnums=(3,))
        self.embeddings = BertEmbeddings(self.config, self.dtype)
        self.layers = [layer_cls(self.config, self.dtype, self.lora, self.attention)
                       for _ in range(self.config.num_hidden_layers)]

    def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None, positions=None,
                 deterministic=True):
        input_ids_BxL = jnp.asarray(input_ids)
        mask_BxL = jnp.asarray(attention_mask)
        token_types_BxL = jnp.zeros_like(input_ids_BxL) if token_type_ids is None else jnp.asarray(token_type_ids)
        if positions is None:
            positions_BxL = bert_positions(mask_BxL, self.config.position_offset)
        else:
            positions_BxL = jnp.asarray(positions) + self.config.position_offset
        segments_BxL = mask_BxL if segment_ids is None else jnp.asarray(segment_ids) * mask_BxL
        mask_Bx1xLxL = layers.attention_mask(segments_BxL)

        x_BxLxD = self.embeddings(input_ids_BxL, token_types_BxL, positions_BxL, deterministic)
        x_BxLxD = self._maybe_freeze(x_BxLxD, stage=0)
        if self.scan_layers and not self.is_initializing():
            return self._scanned_layers(x_BxLxD, mask_Bx1xLxL, deterministic)
        for i, layer in enumerate(self.layers):
            x_BxLxD = layer(x_BxLxD, mask_Bx1xLxL, deterministic)
            x_BxLxD = self._maybe_freeze(x_BxLxD, stage=i + 1)
        return x_BxLxD

    def _scanned_layers(self, x_BxLxD, mask_Bx1xLxL, deterministic):
        """The unrolled loop as one scan per piece of layer_ranges (init creates the params unrolled)."""
        layer = BertLayer(self.config, self.dtype, self.lora, self.attention, parent=None)
        apply_layer = lambda params, x, _, rngs: layer.apply({"params": params}, x, mask_Bx1xLxL, deterministic,
                                                            rngs=rngs)
        for layer_range in layer_ranges(self.config.num_hidden_layers, self.frozen_prefix):
            params_N = stack_layer_params(self.variables["params"], layer_range)
            x_BxLxD, _ = scan_layers(apply_layer, params_N, x_BxLxD, dropout_key=dropout_key_of(self, deterministic),
                                     remat=self.remat)
            x_BxLxD = self._maybe_freeze(x_BxLxD, stage=layer_range.stop)
        return x_BxLxD

    def _maybe_freeze(self, x, stage: int):
        # Gradients stop after the last frozen stage, so XLA skips their backward pass.
        if stage == self.frozen_prefix - 1:
            return jax.lax.stop_gradient(x)
        return layer_boundary(x)

    def vocab_table(self):
        """The MLM decoder's tied table: the word embeddings [V, D] in the compute dtype."""
        return self.embeddings.vocab_table()

    def attend(self, hidden_BxLxD):
        """Logits over the vocabulary with the tied word embeddings: hidden @ E^T (fp32)."""
        return vocab_logits(hidden_BxLxD, self.vocab_table())

