"""Shared transformer building blocks (Flax Linen), used by every model family.

Conventions (stable API; the encoder and decoder families build on these):
- Params are fp32 and created with `nn.with_logical_partitioning(init, axes)`; `dtype` is the
  compute dtype (e.g. jnp.bfloat16): params and inputs are cast to it inside each op.
- Logical axis names: vocab, embed, heads, kv_heads, mlp, norm, position, classes, lora_rank.
- Dropout draws from the "dropout" rng stream (`apply(..., rngs={"dropout": key})`) and only
  when `deterministic=False`; every dropout (hidden, attention, LoRA, heads) takes its mask from
  `keep_mask` (four 16-bit draws per threefry block).
- LoRA: pass the same `lora: LoRASpec | None` to every Dense; a Dense adapts itself when its
  module name is in `lora.targets` (leaves `lora_a` [in, r], `lora_b` [r, out]).

Public API:
  keep_mask(rng, rate, shape) -> bool mask, keep probability KEEP_RESOLUTION-quantised
  dropout(x, rate, rng) -> x * mask / keep probability;  Dropout(rate)(x, deterministic) in Linen
  layer_boundary(x) -> x, its gradient materialised (the backbones apply it between layers)
  Dense(features, axes=("embed", "mlp"), use_bias=True, dtype, kernel_init, lora)(x, deterministic=True)
  attention_mask(segment_ids_BxL, causal=False) -> bool [B, 1, L, L]
  dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, *, dropout_rate=0.0,
                        dropout_rng=None, deterministic=True, dtype=jnp.float32) -> [B, L, H, Dh]
  library_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, *, implementation="xla",
                    dtype=jnp.float32) -> [B, L, H, Dh]     (jax.nn.dot_product_attention, no dropout)
  ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
  MultiHeadAttention(num_heads, head_dim, num_kv_heads=None, qkv_bias=True, out_bias=True,
                     dropout_rate=0.0, dtype, kernel_init, lora, names=(q, k, v, o), rope=None,
                     attention="einsum")
                    (x_BxLxD, mask_Bx1xLxL, positions_BxL=None, deterministic=True) -> [B, L, D]
                    (x_BxLxD, mask_Bx1xLxT, positions_BxL, deterministic, layer_cache) -> ([B, L, D], layer_cache)
     rope: callable(x_BxLxHxDh, positions_BxL) -> x_BxLxHxDh applied to q and k.
     layer_cache (LayerCache, decoding): the L new tokens' keys and values are written to its
     slots [index, index + L) and the queries attend to all T slots under mask_Bx1xLxT.
     attention: "einsum" (dot_product_attention) always; "xla" / "cudnn" run library_attention
     whenever no attention dropout is drawn (deterministic, or dropout_rate 0) and the einsum
     path otherwise, so training with attention dropout computes exactly what "einsum" does.
  LayerNorm(eps=1e-12, dtype, use_bias=True)(x); RMSNorm(eps=1e-6, dtype)(x)
  Mlp(hidden, activation="gelu", use_bias=True, dtype, kernel_init, lora, names=("fc_in", "fc_out"))(x)
  SwiGLU(hidden, dtype, kernel_init, lora, names=("gate_proj", "up_proj", "down_proj"))(x)
  ACTIVATIONS: HF activation name -> function ("gelu" is exact erf, "gelu_new" is tanh).
  KVCache.empty(num_layers, batch, length, num_kv_heads, head_dim, dtype); cache.extend(attention_mask_BxL)
     -> (cache with the new tokens' mask, positions_BxL, positions_BxT, causal mask [B, 1, L, T]);
     cache.layer(i) -> LayerCache; cache.with_layers(layer_caches, length) (decoders' `decode`).
  remat_module(module_cls, mode, static_argnums) -> module_cls wrapped in nn.remat
     ("none" | "full" | "dots"); for `__call__(self, x, mask, positions, deterministic)` pass
     static_argnums=(4,) (self counts as argument 0).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tenure.models.lora import LoRASpec

Dtype = Any
# Large but finite, so a fully masked row softmaxes to a uniform (not NaN) distribution.
MASK_VALUE = -1e30

default_kernel_init = nn.initializers.normal(stddev=0.02)


def _lora_a_init(key, shape, dtype=jnp.float32):
    # Kaiming-uniform with a=sqrt(5), as torch.nn.Linear and PEFT use: bound = 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# Dropout keeps a unit when a 16-bit uniform draw is below round(keep * 2**16), so the keep
# probability is a multiple of 1/65536 (0.9 -> 0.89999, off by < 8e-6); the kept units are scaled
# by the inverse of that exact probability, so the expected output equals the input.
KEEP_RESOLUTION = 1 << 16


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key1, key2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), the generator behind jax.random,
    written as plain uint32 arithmetic: equal bit for bit to jax's `threefry2x32_p`, but
    unrolled, so XLA:CPU fuses it into the loop that consumes the bits (jax lowers it on CPU
    as a rolled while loop that writes every round's state to memory)."""
    keys = (key1, key2, key1 ^ key2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for group in range(5):
        for rotation in _THREEFRY_ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = (x2 << jnp.uint32(rotation)) | (x2 >> jnp.uint32(32 - rotation))
            x2 = x2 ^ x1
        x1 = x1 + keys[(group + 1) % 3]
        x2 = x2 + keys[(group + 2) % 3] + jnp.uint32(group + 1)
    return x1, x2


def _block_counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Two uint32 counters per element of `shape`: the index along axis 0, and the row-major
    index within the remaining axes. Built from iotas, so a sharded array computes its shards'
    counters (and therefore its masks) locally and the same as unsharded."""
    hi = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    lo, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in range(len(shape) - 1, 0, -1):
        lo = lo + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return hi, lo


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Bool mask, True with probability round((1 - rate) * 65536) / 65536, independently per
    element. One threefry2x32 block yields 64 random bits, i.e. four 16-bit draws, so the mask
    costs a quarter of the blocks `jax.random.bernoulli` spends (one per element in the
    partitionable threefry scheme), the largest single cost of a CPU train step's dropout."""
    shape = tuple(shape)
    *lead, last = (1, *shape) if len(shape) < 2 else shape  # counters need a leading axis
    blocks = -(-last // 4)
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    words = data.reshape(-1).astype(jnp.uint32)
    hi, lo = _block_counters((*lead, blocks))
    # Materialised once per block: fused into the mask's 4-way stack, each draw would
    # recompute the whole block.
    bits1, bits2 = jax.lax.optimization_barrier(threefry2x32(words[0], words[1], hi, lo))
    threshold = jnp.uint32(round((1.0 - rate) * KEEP_RESOLUTION))
    draws = (bits1 & 0xFFFF, bits1 >> 16, bits2 & 0xFFFF, bits2 >> 16)
    keep = jnp.stack([d < threshold for d in draws], axis=-1)
    return keep.reshape(*lead, 4 * blocks)[..., :last].reshape(shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout: kept units scaled by 1 / (their exact keep probability)."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    kept = round((1.0 - rate) * KEEP_RESOLUTION)
    # Scaled in fp32: in bf16 the factor itself would round by up to 0.4%, biasing every unit.
    scaled = (x.astype(jnp.float32) * jnp.float32(KEEP_RESOLUTION / kept)).astype(x.dtype)
    return jnp.where(keep_mask(rng, rate, x.shape), scaled, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """`dropout` as a Linen module drawing from the "dropout" rng stream (nn.Dropout's API)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if deterministic or self.rate <= 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


@jax.custom_vjp
def layer_boundary(x):
    """Identity whose gradient XLA must materialise here. Without it XLA:CPU fuses the residual
    stream's backward chain of elementwise adds into each layer's consumers and recomputes it from
    the top for every layer below (quadratic in depth: 27% of a GPT-2 step)."""
    return x


def _layer_boundary_fwd(x):
    return x, None


def _layer_boundary_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


layer_boundary.defvjp(_layer_boundary_fwd, _layer_boundary_bwd)


class Dense(nn.Module):
    """y = x @ kernel [+ bias] [+ dropout(x) @ lora_a @ lora_b * alpha / r]; kernel is [in, out]."""

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    lora: LoRASpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
            (in_features, self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and self.lora.applies_to(self.name):
            lora_a = self.param(
                "lora_a", nn.with_logical_partitioning(_lora_a_init, (self.axes[0], "lora_rank")),
                (in_features, self.lora.rank), jnp.float32)
            lora_b = self.param(
                "lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                (self.lora.rank, self.features), jnp.float32)
            x_in = Dropout(self.lora.dropout)(x, deterministic=deterministic)
            delta = jnp.dot(jnp.dot(x_in, lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
            y = y + delta * jnp.asarray(self.lora.scale, self.dtype)
        return y


def vocab_logits(hidden_BxLxD, table_VxD, bias_V=None):
    """hidden @ table^T in the table's (compute) dtype, then fp32 (+ bias): the LM / MLM logits
    [B, L, V] (or any leading shape). Backbones' `attend`, the task heads' logits and the
    chunks of tenure.engine.tasks.losses.vocab_ce all come from this one function.

    In bf16 the dot's output is bf16, like every Dense layer here and like PyTorch autocast
    (HF upcasts the logits for the loss): on CPU, oneDNN runs bf16 -> bf16 dots 4x faster than
    bf16 -> fp32 ones (docs/performance.md). fp32 is unchanged."""
    logits = jnp.einsum("...d,vd->...v", hidden_BxLxD.astype(table_VxD.dtype), table_VxD).astype(jnp.float32)
    return logits if bias_V is None else logits + bias_V


def attention_mask(segment_ids_BxL: jax.Array, causal: bool = False) -> jax.Array:
    """Bool [B, 1, L, L]: query i may attend key j iff both are in the same non-zero segment
    (and j <= i when causal). A plain padding mask is segment_ids = attention_mask (1 / 0)."""
    seg_BxL = jnp.asarray(segment_ids_BxL)
    same_BxLxL = seg_BxL[:, :, None] == seg_BxL[:, None, :]
    real_BxLxL = (seg_BxL[:, :, None] != 0) & (seg_BxL[:, None, :] != 0)
    mask_BxLxL = same_BxLxL & real_BxLxL
    if causal:
        length = seg_BxL.shape[1]
        mask_BxLxL = mask_BxLxL & jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    return mask_BxLxL[:, None]


def dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, *, dropout_rate=0.0,
                          dropout_rng=None, deterministic=True, dtype=jnp.float32):
    """Scaled dot-product attention with grouped-query heads (H a multiple of K).

    Scores and softmax are fp32; masked scores are MASK_VALUE (finite), so rows with no
    allowed key give finite (uniform) weights instead of NaN.

    Heads-major: each kv head's G query heads are stacked along the query axis, so both dots
    are plain batched matmuls over [B, K] and only the small q / k / v / output are transposed
    (contracting in the [B, L, H, Dh] layout made XLA:CPU transpose the [B, H, L, S]
    probabilities instead; 4% of a MiniLM train step)."""
    batch, q_len, num_heads, head_dim = q_BxLxHxDh.shape
    num_kv = k_BxSxKxDh.shape[2]
    group = num_heads // num_kv
    q_BxKxGLxDh = (q_BxLxHxDh.astype(dtype).reshape(batch, q_len, num_kv, group, head_dim)
                   .transpose(0, 2, 3, 1, 4).reshape(batch, num_kv, group * q_len, head_dim))
    k_BxKxSxDh = k_BxSxKxDh.astype(dtype).transpose(0, 2, 1, 3)
    v_BxKxSxDh = v_BxSxKxDh.astype(dtype).transpose(0, 2, 1, 3)
    scores_BxKxGLxS = jnp.einsum("bkqd,bksd->bkqs", q_BxKxGLxDh, k_BxKxSxDh, preferred_element_type=jnp.float32)
    scores_BxKxGLxS = scores_BxKxGLxS / jnp.sqrt(jnp.float32(head_dim))
    mask_Bx1xLxS = jnp.asarray(mask_Bx1xLxS)
    repeat = group if mask_Bx1xLxS.shape[2] > 1 else 1  # a [B, 1, 1, S] mask broadcasts as it is
    mask_Bx1xGLxS = jnp.tile(mask_Bx1xLxS, (1, 1, repeat, 1))
    scores_BxKxGLxS = jnp.where(mask_Bx1xGLxS, scores_BxKxGLxS, MASK_VALUE)
    probs_BxKxGLxS = jax.nn.softmax(scores_BxKxGLxS, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        probs_BxKxGLxS = dropout(probs_BxKxGLxS, dropout_rate, dropout_rng)
    out_BxKxGLxDh = jnp.einsum("bkqs,bksd->bkqd", probs_BxKxGLxS.astype(dtype), v_BxKxSxDh)
    out_BxLxKxGxDh = out_BxKxGLxDh.reshape(batch, num_kv, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out_BxLxKxGxDh.reshape(batch, q_len, num_heads, head_dim)


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def library_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, *, implementation="xla",
                      dtype=jnp.float32):
    """The same attention through `jax.nn.dot_product_attention` (no dropout): "xla" is its
    portable implementation, "cudnn" cuDNN's fused flash attention (GPU, bf16 / fp16 only).

    Grouped-query heads (K < H) go in as they are. The boolean mask selects the allowed keys;
    both implementations put a large finite negative at the others, so a query row with no allowed
    key (a padding row) gets finite uniform weights like the einsum path; "cudnn" outputs for
    such rows are set to 0 as well (a fused kernel's choice there is not ours to rely on). Padding
    rows are never keys of real rows, so neither choice reaches a real token."""
    args = [a.astype(dtype) for a in (q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh)]
    mask_Bx1xLxS = jnp.asarray(mask_Bx1xLxS, bool)
    out_BxLxHxDh = jax.nn.dot_product_attention(*args, mask=mask_Bx1xLxS, implementation=implementation)
    if implementation == "cudnn":
        has_key_BxLx1x1 = jnp.any(mask_Bx1xLxS, axis=-1)[:, 0, :, None, None]
        out_BxLxHxDh = jnp.where(has_key_BxLx1x1, out_BxLxHxDh, jnp.zeros((), out_BxLxHxDh.dtype))
    return out_BxLxHxDh


class LayerCache(NamedTuple):
    """One layer's keys and values [B, T, K, Dh] and the slot its next tokens go to (int32 [])."""

    keys_BxTxKxDh: jax.Array
    values_BxTxKxDh: jax.Array
    index: jax.Array


@flax.struct.dataclass
class KVCache:
    """Every layer's keys and values for decoding, in fixed-size slots [0, T): slots [0, index)
    hold the tokens run so far (real or padding, as mask_BxT says), the rest are free.

    Positions are cumsum(mask) - 1 over the slots (0 on padding): the positions a full forward
    over the same tokens computes, so learned positions and RoPE match it."""

    keys_NxBxTxKxDh: jax.Array
    values_NxBxTxKxDh: jax.Array
    mask_BxT: jax.Array      # int32: 1 on real tokens written so far; 0 on padding and free slots
    index: jax.Array         # int32 []: the first free slot

    @classmethod
    def empty(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype: Dtype) -> "KVCache":
        zeros = jnp.zeros((num_layers, batch, length, num_kv_heads, head_dim), dtype)
        return cls(zeros, zeros, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))

    def extend(self, attention_mask_BxL: jax.Array) -> tuple["KVCache", jax.Array, jax.Array, jax.Array]:
        """Reserve slots [index, index + L) for L new tokens with this mask: (the cache with their
        mask written, their positions [B, L], every slot's positions [B, T], and the attention
        mask [B, 1, L, T]: query slot s sees key slot j iff j holds a real token and j <= s)."""
        length = attention_mask_BxL.shape[1]
        mask_BxT = jax.lax.dynamic_update_slice_in_dim(
            self.mask_BxT, attention_mask_BxL.astype(jnp.int32), self.index, axis=1)
        positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0).astype(jnp.int32)
        positions_BxL = jax.lax.dynamic_slice_in_dim(positions_BxT, self.index, length, axis=1)
        query_slots_L = self.index + jnp.arange(length)
        causal_LxT = jnp.arange(mask_BxT.shape[1])[None, :] <= query_slots_L[:, None]
        attend_Bx1xLxT = ((mask_BxT != 0)[:, None, :] & causal_LxT[None])[:, None]
        return self.replace(mask_BxT=mask_BxT), positions_BxL, positions_BxT, attend_Bx1xLxT

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.keys_NxBxTxKxDh[i], self.values_NxBxTxKxDh[i], self.index)

    def with_layers(self, layer_caches: list[LayerCache], length: int) -> "KVCache":
        """The cache after every layer wrote its `length` new tokens."""
        return self.replace(keys_NxBxTxKxDh=jnp.stack([c.keys_BxTxKxDh for c in layer_caches]),
                            values_NxBxTxKxDh=jnp.stack([c.values_BxTxKxDh for c in layer_caches]),
                            index=self.index + length)


class MultiHeadAttention(nn.Module):
    """Self-attention: Dense q/k/v ([D, H*Dh] / [D, K*Dh]), attention, Dense output [H*Dh, D]."""

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    lora: LoRASpec | None = None
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    rope: Callable | None = None
    attention: str = "einsum"        # einsum | xla | cudnn (see library_attention)

    @nn.compact
    def __call__(self, x_BxLxD, mask_Bx1xLxS, positions_BxL=None, deterministic: bool = True,
                 layer_cache: LayerCache | None = None):
        """Keys are the L tokens themselves (S = L, mask [B, 1, L, L]) or, given `layer_cache`,
        its T slots with the L new tokens written at [index, index + L) (S = T, mask [B, 1, L, T]);
        then the updated LayerCache is returned with the output."""
        batch, length, embed = x_BxLxD.shape
        num_kv = self.num_kv_heads or self.num_heads
        dense = lambda feats, axes, bias, name: Dense(
            feats, axes, bias, self.dtype, self.kernel_init, self.lora, name=name)
        q_name, k_name, v_name, o_name = self.names
        q = dense(self.num_heads * self.head_dim, ("embed", "heads"), self.qkv_bias, q_name)(x_BxLxD, deterministic)
        k = dense(num_kv * self.head_dim, ("embed", "kv_heads"), self.qkv_bias, k_name)(x_BxLxD, deterministic)
        v = dense(num_kv * self.head_dim, ("embed", "kv_heads"), self.qkv_bias, v_name)(x_BxLxD, deterministic)
        q_BxLxHxDh = q.reshape(batch, length, self.num_heads, self.head_dim)
        k_BxSxKxDh = k.reshape(batch, length, num_kv, self.head_dim)
        v_BxSxKxDh = v.reshape(batch, length, num_kv, self.head_dim)
        if self.rope is not None:
            q_BxLxHxDh = self.rope(q_BxLxHxDh, positions_BxL)
            k_BxSxKxDh = self.rope(k_BxSxKxDh, positions_BxL)
        if layer_cache is not None:
            write = lambda slots_BxTxKxDh, new_BxLxKxDh: jax.lax.dynamic_update_slice_in_dim(
                slots_BxTxKxDh, new_BxLxKxDh.astype(slots_BxTxKxDh.dtype), layer_cache.index, axis=1)
            layer_cache = LayerCache(write(layer_cache.keys_BxTxKxDh, k_BxSxKxDh),
                                     write(layer_cache.values_BxTxKxDh, v_BxSxKxDh), layer_cache.index)
            k_BxSxKxDh, v_BxSxKxDh = layer_cache.keys_BxTxKxDh, layer_cache.values_BxTxKxDh
        needs_rng = not deterministic and self.dropout_rate > 0.0
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}; "
                             f"got {self.attention!r}")
        if self.attention != "einsum" and not needs_rng:
            out_BxLxHxDh = library_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS,
                                             implementation=self.attention, dtype=self.dtype)
        else:  # einsum, or attention dropout (jax.nn.dot_product_attention has none)
            out_BxLxHxDh = dot_product_attention(
                q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, dropout_rate=self.dropout_rate,
                dropout_rng=self.make_rng("dropout") if needs_rng else None,
                deterministic=deterministic, dtype=self.dtype)
        out_BxLxHD = out_BxLxHxDh.reshape(batch, length, self.num_heads * self.head_dim)
        out_BxLxD = dense(embed, ("heads", "embed"), self.out_bias, o_name)(out_BxLxHD, deterministic)
        return out_BxLxD if layer_cache is None else (out_BxLxD, layer_cache)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in fp32 (two-pass variance, like torch)."""

    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
        if self.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                               (features,), jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (Llama): x / rms(x) in fp32, cast to the compute dtype, then times scale."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def _gelu_erf(x):
    # x * Phi(x) through erf, as PyTorch computes it: 2x cheaper fwd + bwd on CPU than
    # jax.nn.gelu's erfc form, which is more exact only where gelu(x) is below 1e-6.
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype)))


def _gelu_erf_fwd(x):
    # keep only x (bf16 under bf16 compute): autodiff kept XLA's fp32 erf for the backward
    return _gelu_erf(x), x


def _gelu_erf_bwd(x, g):
    x32 = x.astype(jnp.float32)
    phi = 0.5 + 0.5 * jax.lax.erf(x32 * (1 / math.sqrt(2)))
    pdf = jnp.exp(-0.5 * x32 * x32) * (1 / math.sqrt(2 * math.pi))
    return ((g.astype(jnp.float32) * (phi + x32 * pdf)).astype(g.dtype),)


_gelu_erf.defvjp(_gelu_erf_fwd, _gelu_erf_bwd)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class Mlp(nn.Module):
    """Dense(hidden) -> activation -> Dense(D)."""

    hidden: int
    activation: str = "gelu"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    lora: LoRASpec | None = None
    names: tuple[str, str] = ("fc_in", "fc_out")

    @nn.compact
    def __call__(self, x_BxLxD, deterministic: bool = True):
        act = ACTIVATIONS[self.activation]
        h = Dense(self.hidden, ("embed", "mlp"), self.use_bias, self.dtype, self.kernel_init, self.lora,
                  name=self.names[0])(x_BxLxD, deterministic)
        return Dense(x_BxLxD.shape[-1], ("mlp", "embed"), self.use_bias, self.dtype, self.kernel_init,
                     self.lora, name=self.names[1])(act(h), deterministic)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Llama / Qwen2 / Mistral)."""

    hidden: int
    dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    lora: LoRASpec | None = None
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @nn.compact
    def __call__(self, x_BxLxD, deterministic: bool = True):
        dense = lambda feats, axes, name: Dense(feats, axes, False, self.dtype, self.kernel_init, self.lora,
                                                name=name)
        gate = dense(self.hidden, ("embed", "mlp"), self.names[0])(x_BxLxD, deterministic)
        up = dense(self.hidden, ("embed", "mlp"), self.names[1])(x_BxLxD, deterministic)
        return dense(x_BxLxD.shape[-1], ("mlp", "embed"), self.names[2])(jax.nn.silu(gate) * up, deterministic)


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_module(module_cls, mode: str, static_argnums: tuple[int, ...] = ()):
    """Wrap a layer class in nn.remat: "none" (as is), "full" (recompute everything in the
    backward pass) or "dots" (save matmul outputs, recompute the rest)."""
    if mode == "none":
        return module_cls
    if mode not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of none, full, dots; got {mode!r}")
    return nn.remat(module_cls, policy=REMAT_POLICIES[mode], static_argnums=static_argnums)
