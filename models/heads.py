"""Task heads on top of a backbone's hidden states [B, L, D], and the pooling function.

Packed batches (engine/data/batch_packing.py) hold several examples per row: hidden is
[R, L, D] and `Examples` locates each of the B examples (its row, the position of its first
token, the rows' segment ids); `pool` then gives one vector per example, [B, D].

Param names (under "head" in the task model): "pooler" (BERT dense+tanh), "classifier",
"transform" + "transform_norm" + "bias" (BERT MLM), "lm_head" (untied causal LM).

The vocabulary heads (MlmHead, LmHead) return the inputs of their projection, a `Vocab`
(hidden [B, L, D], table [V, D], bias [V] or None); `vocab_logits` turns it into logits
[B, L, V]. The train step never does: tenure.engine.tasks.losses' cross-entropy projects a chunk of
positions at a time, so the full fp32 [B, L, V] logits are never held.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tenure.models.layers import ACTIVATIONS, Dense, Dropout, LayerNorm


class Examples(NamedTuple):
    """Where the examples of a packed batch lie: example b is the tokens of segment
    segment_ids[row[b], start[b]] in row row[b], starting at position start[b]."""

    row: jax.Array           # [B] int32
    start: jax.Array         # [B] int32
    segment_ids: jax.Array   # [R, L] int32, 0 = pad


def pool(hidden_BxLxD, attention_mask_BxL, pooling: str, examples: Examples | None = None):
    """One vector per example: "cls" (first token), "mean" (over its real tokens), "last" (its last
    real token). Unpacked (`examples` None) row b is example b; packed, see `Examples`."""
    if examples is not None:
        return _pool_packed(hidden_BxLxD, examples, pooling)
    mask_BxL = jnp.asarray(attention_mask_BxL)
    if pooling == "cls":
        return hidden_BxLxD[:, 0]
    if pooling == "mean":
        weights_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
        summed_BxD = jnp.sum(hidden_BxLxD.astype(jnp.float32) * weights_BxLx1, axis=1)
        # Clamp like sentence-transformers so an all-pad row gives zeros, not NaN.
        return summed_BxD / jnp.maximum(weights_BxLx1.sum(axis=1), 1e-9)
    if pooling == "last":
        length = mask_BxL.shape[1]
        # Highest index holding a real token: works for right padding and packed rows.
        last_B = jnp.argmax(jnp.where(mask_BxL > 0, jnp.arange(length), -1), axis=1)
        return jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling must be cls, mean or last; got {pooling!r}")


def _pool_packed(hidden_RxLxD, examples: Examples, pooling: str):
    row_B, start_B = jnp.asarray(examples.row), jnp.asarray(examples.start)
    if pooling == "cls":
        return hidden_RxLxD[row_B, start_B]
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be cls, mean or last; got {pooling!r}")
    seg_RxL = jnp.asarray(examples.segment_ids)
    seg_B = seg_RxL[row_B, start_B]
    own_BxL = (seg_RxL[row_B] == seg_B[:, None]) & (seg_B[:, None] != 0)  # the example's tokens in its row
    if pooling == "last":
        last_B = jnp.argmax(jnp.where(own_BxL, jnp.arange(own_BxL.shape[1]), -1), axis=1)
        return hidden_RxLxD[row_B, last_B]
    # Mean: weights [B, R, L] select the example's tokens; fp32 like the unpacked mean, all-pad gives zeros.
    in_row_BxR = row_B[:, None] == jnp.arange(hidden_RxLxD.shape[0])[None, :]
    weights_BxRxL = (in_row_BxR[:, :, None] & own_BxL[:, None, :]).astype(jnp.float32)
    summed_BxD = jnp.einsum("brl,rld->bd", weights_BxRxL, hidden_RxLxD.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
    return summed_BxD / jnp.maximum(own_BxL.sum(axis=1, dtype=jnp.float32), 1e-9)[:, None]


class Pooler(nn.Module):
    """BERT pooler: tanh(dense(the [CLS] vector [B, D]))."""

    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, cls_BxD):
        return jnp.tanh(Dense(cls_BxD.shape[-1], ("embed", None), dtype=self.dtype,
                              kernel_init=self.kernel_init, name="dense")(cls_BxD))


class ClassifierHead(nn.Module):
    """Sequence-level logits [B, C] (one row per example; packed batches pass `examples`). With
    use_pooler the head owns the BERT pooler (so the HF export is complete) and "cls" pooling goes
    through it; other poolings skip it."""

    num_labels: int
    pooling: str = "cls"
    use_pooler: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    use_bias: bool = True  # decoders' HF score layers have none

    @nn.compact
    def __call__(self, hidden_BxLxD, attention_mask_BxL, deterministic=True, examples: Examples | None = None):
        pooler = Pooler(self.dtype, self.kernel_init, name="pooler") if self.use_pooler else None
        if pooler is not None and self.pooling == "cls":
            pooled_BxD = pooler(pool(hidden_BxLxD, attention_mask_BxL, "cls", examples))
        else:
            if pooler is not None and self.is_initializing():
                pooler(hidden_BxLxD[:, 0])  # create the (unused) pooler params
            pooled_BxD = pool(hidden_BxLxD, attention_mask_BxL, self.pooling, examples).astype(self.dtype)
        pooled_BxD = Dropout(self.dropout_rate)(pooled_BxD, deterministic=deterministic)
        return Dense(self.num_labels, ("embed", "classes"), self.use_bias, dtype=self.dtype,
                     kernel_init=self.kernel_init, name="classifier")(pooled_BxD).astype(jnp.float32)


class TokenClassifierHead(nn.Module):
    """Per-token logits [B, L, C]."""

    num_labels: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, hidden_BxLxD, deterministic=True):
        hidden_BxLxD = Dropout(self.dropout_rate)(hidden_BxLxD, deterministic=deterministic)
        return Dense(self.num_labels, ("embed", "classes"), dtype=self.dtype, kernel_init=self.kernel_init,
                     name="classifier")(hidden_BxLxD).astype(jnp.float32)


class Vocab(NamedTuple):
    """The inputs of a vocabulary projection: logits = hidden @ table^T (+ bias), fp32."""

    hidden: jax.Array        # [B, L, D], compute dtype
    table: jax.Array         # [V, D], compute dtype (a cast of the fp32 param)
    bias: jax.Array | None   # [V] fp32, or None


class MlmHead(nn.Module):
    """BERT MLM: dense -> activation -> LayerNorm -> tied decoder (word embeddings^T) + bias.
    Returns the projection's inputs (`Vocab`); `vocab_table()` is the backbone's table."""

    vocab_size: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, hidden_BxLxD, vocab_table: Callable) -> Vocab:
        h_BxLxD = Dense(hidden_BxLxD.shape[-1], ("embed", None), dtype=self.dtype, kernel_init=self.kernel_init,
                        name="transform")(hidden_BxLxD)
        h_BxLxD = LayerNorm(self.layer_norm_eps, self.dtype, name="transform_norm")(ACTIVATIONS[self.activation](h_BxLxD))
        bias_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                            (self.vocab_size,), jnp.float32)
        return Vocab(h_BxLxD, vocab_table(), bias_V)


class LmHead(nn.Module):
    """Causal LM: the projection's inputs (`Vocab`) with the backbone's token table (tied) or an
    untied "lm_head" kernel [D, V] (the param of a bias-free Dense, as HF names it)."""

    vocab_size: int
    tied: bool = True
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, hidden_BxLxD, vocab_table: Callable) -> Vocab:
        if self.tied:
            return Vocab(hidden_BxLxD, vocab_table(), None)
        kernel_DxV = _Kernel(self.vocab_size, ("embed", "vocab"), self.kernel_init, name="lm_head")(hidden_BxLxD)
        return Vocab(hidden_BxLxD, kernel_DxV.T.astype(self.dtype), None)


class _Kernel(nn.Module):
    """The "kernel" param [in, features] of a Dense layer, without applying it."""

    features: int
    axes: tuple[str | None, str | None]
    kernel_init: Callable

    @nn.compact
    def __call__(self, x):
        return self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                          (x.shape[-1], self.features), jnp.float32)


class EmbeddingHead(nn.Module):
    """Sentence embeddings [B, D] in fp32, L2-normalised like sentence-transformers' Normalize.

    With use_pooler it also owns the BERT pooler params, unused here but carried so that an
    export is a complete HF *Model (the engine should freeze "head/pooler")."""

    pooling: str = "mean"
    normalize: bool = True
    use_pooler: bool = False
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, hidden_BxLxD, attention_mask_BxL):
        if self.use_pooler and self.is_initializing():
            Pooler(self.dtype, self.kernel_init, name="pooler")(hidden_BxLxD[:, 0])
        emb_BxD = pool(hidden_BxLxD, attention_mask_BxL, self.pooling).astype(jnp.float32)
        if self.normalize:
            emb_BxD = emb_BxD / jnp.maximum(jnp.linalg.norm(emb_BxD, axis=-1, keepdims=True), 1e-12)
        return emb_BxD
