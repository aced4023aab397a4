"""Llama-family decoder backbone (Llama, Qwen2, Mistral) in Flax Linen.

Pre-RMSNorm blocks, grouped-query attention with RoPE, SwiGLU MLP, final RMSNorm; LM head
tied to the token embedding (`vocab_table`) or untied (the task wrapper's head/lm_head).
Family differences are config values: Qwen2 has q/k/v bias (no o bias) and optional sliding
layers; Mistral has a sliding window on every layer; Llama's `attention_bias` biases q/k/v/o.
Param tree: embeddings/token, layers_{i}/{attn_norm, attn/{q_proj, k_proj, v_proj, o_proj},
mlp_norm, mlp/{gate_proj, up_proj, down_proj}}, final_norm.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tenure.models.errors import TenureError
from tenure.models.layer_scan import dropout_key_of, layer_ranges, scan_layers, stack_layer_params
from tenure.models.layers import KVCache, LayerCache, MultiHeadAttention, RMSNorm, SwiGLU, layer_boundary, remat_module
from tenure.models.layers import vocab_logits
from tenure.models.layers import attention_mask as segment_mask
from tenure.models.lora import LoRASpec
from tenure.models.rope import RopeSpec, apply_rope, inverse_frequencies, positions_from_segments, sliding_window_mask

MODEL_TYPES = ("llama", "qwen2", "mistral")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"           # llama | qwen2 | mistral (decides HF names on export)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008      # SwiGLU hidden width
    num_layers: int = 32                # num_hidden_layers
    num_heads: int = 32                 # num_attention_heads
    num_kv_heads: int = 32              # num_key_value_heads (< num_heads: grouped-query attention)
    head_dim: int = 128                 # from config when given, else hidden_size // num_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeSpec = RopeSpec()
    qkv_bias: bool = False              # bias on q/k/v (Qwen2; Llama attention_bias)
    o_bias: bool = False                # bias on o_proj (Llama attention_bias)
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False   # LM head = token embedding (vocab_table)
    sliding_window: int | None = None   # SLIDING layers see keys with q - k < window (HF Mistral)
    layer_types: tuple[str, ...] = ()   # per layer FULL or SLIDING; () means all FULL
    max_window_layers: int = 28         # Qwen2 only (kept for export)
    initializer_range: float = 0.02     # stddev of fresh kernels
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None   # Llama 3 lists several
    pad_token_id: int | None = None

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and bool(self.layer_types) and self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise TenureError(f"config.json: model_type {model_type!r} is not a Llama-family model")
        if d.get("hidden_act", "silu") != "silu":
            raise TenureError(f"config.json: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("mlp_bias", False):
            raise TenureError("config.json: mlp_bias=true is not supported")
        heads = d["num_attention_heads"]
        layers = d["num_hidden_layers"]
        window = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        layer_types = tuple(d.get("layer_types") or ())
        if not layer_types:
            if model_type == "qwen2":
                start = d.get("max_window_layers", 28)
                layer_types = tuple(SLIDING if window is not None and i >= start else FULL for i in range(layers))
            else:
                layer_types = (SLIDING if window is not None else FULL,) * layers
        if model_type == "mistral":  # HF Mistral slides on every layer whenever sliding_window is set
            layer_types = (SLIDING if window is not None else FULL,) * layers
        bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=layers, num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope=RopeSpec.from_hf(d),
            qkv_bias=True if model_type == "qwen2" else bias, o_bias=bias if model_type == "llama" else False,
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), sliding_window=window,
            layer_types=layer_types, max_window_layers=d.get("max_window_layers", 28),
            initializer_range=d.get("initializer_range", 0.02), bos_token_id=d.get("bos_token_id"),
            eos_token_id=_hashable(d.get("eos_token_id")), pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        d = {
            "model_type": self.model_type, "architectures": [arch[self.model_type]],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": self.rope.to_hf(), "hidden_act": "silu",
            "attention_dropout": self.attention_dropout, "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range, "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise TenureError("export: Llama's attention_bias covers q/k/v/o together; "
                                  "this model has q/k/v bias without o bias (export it as qwen2)")
            d.update(attention_bias=self.qkv_bias, mlp_bias=False)
        elif self.model_type == "qwen2":
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=self.max_window_layers, layer_types=list(self.layer_types))
        else:
            d.update(sliding_window=self.sliding_window)
        return d


def _hashable(value):
    """Config values are hashable (the config is a static module attribute): lists become tuples."""
    return tuple(value) if isinstance(value, list) else value


def _rope(spec: RopeSpec, head_dim: int):
    inv_freq = inverse_frequencies(spec, head_dim)
    return lambda x_BxLxHxDh, positions_BxL: apply_rope(x_BxLxHxDh, positions_BxL, inv_freq)


class LlamaEmbeddings(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.initializers.normal(self.config.initializer_range)
        self.token = self.param("token", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (self.config.vocab_size, self.config.hidden_size), jnp.float32)

    def __call__(self, input_ids_BxL):
        return jnp.take(self.token, input_ids_BxL, axis=0).astype(self.dtype)

    def vocab_table(self):
        return self.token.astype(self.dtype)


class LlamaBlock(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    lora: LoRASpec | None = None
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x_BxLxD, mask_Bx1xLxS, positions_BxL, deterministic: bool = True,
                 layer_cache: LayerCache | None = None):
        """-> x_BxLxD, or (x_BxLxD, layer_cache) when decoding with a cache (MultiHeadAttention)."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        h_BxLxD = RMSNorm(cfg.rms_norm_eps, self.dtype, name="attn_norm")(x_BxLxD)
        attended = MultiHeadAttention(
            num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
            qkv_bias=cfg.qkv_bias, out_bias=cfg.o_bias, dropout_rate=cfg.attention_dropout, dtype=self.dtype,
            kernel_init=init, lora=self.lora, rope=_rope(cfg.rope, cfg.head_dim), attention=self.attention,
            name="attn",
        )(h_BxLxD, mask_Bx1xLxS, positions_BxL, deterministic, layer_cache)
        h_BxLxD, layer_cache = (attended, None) if layer_cache is None else attended
        x_BxLxD = x_BxLxD + h_BxLxD
        h_BxLxD = RMSNorm(cfg.rms_norm_eps, self.dtype, name="mlp_norm")(x_BxLxD)
        h_BxLxD = SwiGLU(cfg.intermediate_size, self.dtype, init, self.lora, name="mlp")(h_BxLxD, deterministic)
        x_BxLxD = x_BxLxD + h_BxLxD
        return x_BxLxD if layer_cache is None else (x_BxLxD, layer_cache)


class LlamaDecoder(nn.Module):
    """`__call__(input_ids, attention_mask, token_type_ids=None, segment_ids=None, positions=None,
    deterministic=True) -> hidden_BxLxD` (after the final RMSNorm); `vocab_table() -> [V, D]` (the tied LM head)
    (fp32; only meaningful when config.tie_word_embeddings).

    token_type_ids are ignored (no segment embedding). Positions default to each token's index
    among the real tokens of its segment. Each stage output is sown to
    "intermediates"/"hidden_states" (embeddings, layers_0, ...).
    scan_layers runs the layers under jax.lax.scan (tenure.models.layer_scan): same params, same outputs,
    one compiled layer body. `init_cache` / `decode` run it with a KV cache (tenure.models.generate).
    """

    config: LlamaConfig
    dtype: Any = jnp.float32         # compute dtype; params stay fp32
    frozen_prefix: int = 0           # leading stages [embeddings, layers_0, ...] run forward-only
    remat: str = "none"              # none | full | dots
    lora: LoRASpec | None = None
    attention: str = "einsum"        # einsum | xla | cudnn (tenure.models.layers.MultiHeadAttention)
    scan_layers: bool = False        # layers under jax.lax.scan (tenure.models.layer_scan)

    def setup(self):
        cfg = self.config
        block = remat_module(LlamaBlock, self.remat, static_argnums=(4,))
        self.embeddings = LlamaEmbeddings(cfg, self.dtype)
        self.layers = [block(cfg, self.dtype, self.lora, self.attention) for _ in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

    def _stage_out(self, stage: int, x_BxLxD):
        self.sow("intermediates", "hidden_states", x_BxLxD)
        if stage == self.frozen_prefix - 1:
            return jax.lax.stop_gradient(x_BxLxD)
        return layer_boundary(x_BxLxD)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None, positions=None,
                 deterministic: bool = True):
        del token_type_ids
        cfg = self.config
        segments_BxL = attention_mask if segment_ids is None else segment_ids
        positions_BxL = positions_from_segments(segments_BxL) if positions is None else positions
        full_Bx1xLxL = segment_mask(segments_BxL, causal=True)
        sliding_Bx1xLxL = None
        if cfg.sliding_window is not None and any(cfg.is_sliding(i) for i in range(cfg.num_layers)):
            sliding_Bx1xLxL = full_Bx1xLxL & sliding_window_mask(positions_BxL, cfg.sliding_window)
        x_BxLxD = self._stage_out(0, self.embeddings(input_ids))
        if self.scan_layers and not self.is_initializing():
            x_BxLxD = self._scanned_layers(x_BxLxD, full_Bx1xLxL, sliding_Bx1xLxL, positions_BxL, deterministic)
        else:
            for i, layer in enumerate(self.layers):
                mask_Bx1xLxL = sliding_Bx1xLxL if cfg.is_sliding(i) else full_Bx1xLxL
                x_BxLxD = self._stage_out(i + 1, layer(x_BxLxD, mask_Bx1xLxL, positions_BxL, deterministic))
        return self.final_norm(x_BxLxD)

    def _scanned_layers(self, x_BxLxD, full_Bx1xLxL, sliding_Bx1xLxL, positions_BxL, deterministic):
        """The unrolled loop as one scan per piece of layer_ranges (init creates the params unrolled).
        A layer's sliding flag is scanned alongside its params and picks its mask."""
        cfg = self.config
        layer = LlamaBlock(cfg, self.dtype, self.lora, self.attention, parent=None)

        def apply_layer(params, x_BxLxD, is_sliding, rngs):
            mask_Bx1xLxL = full_Bx1xLxL if sliding_Bx1xLxL is None else jnp.where(
                is_sliding, sliding_Bx1xLxL, full_Bx1xLxL)
            return layer.apply({"params": params}, x_BxLxD, mask_Bx1xLxL, positions_BxL, deterministic, rngs=rngs)

        for layer_range in layer_ranges(cfg.num_layers, self.frozen_prefix):
            params_N = stack_layer_params(self.variables["params"], layer_range)
            is_sliding_N = jnp.array([cfg.is_sliding(i) for i in layer_range])
            x_BxLxD, outputs_NxBxLxD = scan_layers(
                apply_layer, params_N, x_BxLxD, is_sliding_N, dropout_key=dropout_key_of(self, deterministic),
                remat=self.remat, keep_outputs=self.is_mutable_collection("intermediates"))
            if outputs_NxBxLxD is not None:  # sown stage by stage, as unrolled; _stage_out sows the last
                for output_BxLxD in outputs_NxBxLxD[:-1]:
                    self.sow("intermediates", "hidden_states", output_BxLxD)
            x_BxLxD = self._stage_out(layer_range.stop, x_BxLxD)
        return x_BxLxD

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache of `length` slots per row, in the compute dtype (for `decode`)."""
        cfg = self.config
        return KVCache.empty(cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim, self.dtype)

    def decode(self, input_ids_BxL, attention_mask_BxL, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run L new tokens per row after the ones in `cache` (a prompt, then one token at a time):
        (hidden_BxLxD after the final RMSNorm, the cache with their keys and values). Positions and
        masks are those `__call__` computes on the whole sequence (padding, causal, sliding window).
        The layers run unrolled even under scan_layers (a scanned step would copy the stacked
        params every token)."""
        cfg = self.config
        cache, positions_BxL, positions_BxT, full_Bx1xLxT = cache.extend(attention_mask_BxL)
        sliding_Bx1xLxT = None
        if cfg.sliding_window is not None:
            sliding_Bx1xLxT = full_Bx1xLxT & sliding_window_mask(positions_BxL, cfg.sliding_window, positions_BxT)
        x_BxLxD = self.embeddings(input_ids_BxL)
        layer_caches = []
        for i, layer in enumerate(self.layers):
            mask_Bx1xLxT = sliding_Bx1xLxT if cfg.is_sliding(i) else full_Bx1xLxT
            x_BxLxD, layer_cache = layer(x_BxLxD, mask_Bx1xLxT, positions_BxL, True, cache.layer(i))
            layer_caches.append(layer_cache)
        return self.final_norm(x_BxLxD), cache.with_layers(layer_caches, input_ids_BxL.shape[1])

    def vocab_table(self):
        """The tied LM head: the token embedding [V, D] in the compute dtype."""
        return self.embeddings.vocab_table()

    def attend(self, hidden_BxLxD):
        """Logits [B, L, V] (fp32) of the tied LM head."""
        return vocab_logits(hidden_BxLxD, self.vocab_table())
