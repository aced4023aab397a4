"""GPT-2 decoder backbone (Flax Linen): learned positions, pre-LayerNorm blocks, gelu_new MLP,
final `ln_f`, and an LM head tied to the token embedding (`vocab_table`).

HF's fused `c_attn` [D, 3D] is split into three Dense layers (`c_attn_q/k/v`) so each can be
sharded over heads; a LoRA target "c_attn" adapts all three (see `_expand_lora`).
Param tree: embeddings/{token, position}, layers_{i}/{attn_norm, attn/{c_attn_q, c_attn_k,
c_attn_v, c_proj}, mlp_norm, mlp/{c_fc, c_proj}}, final_norm.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tenure.models.errors import TenureError
from tenure.models.layer_scan import dropout_key_of, layer_ranges, scan_layers, stack_layer_params
from tenure.models.layers import ACTIVATIONS, Dropout, KVCache, LayerCache, LayerNorm, Mlp, MultiHeadAttention
from tenure.models.layers import layer_boundary, remat_module, vocab_logits
from tenure.models.layers import attention_mask as segment_mask
from tenure.models.lora import LoRASpec
from tenure.models.rope import positions_from_segments


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    max_positions: int = 1024          # n_positions: rows of the learned position table
    hidden_size: int = 768             # n_embd
    num_layers: int = 12               # n_layer
    num_heads: int = 12                # n_head
    mlp_hidden: int | None = None      # n_inner; None means 4 * hidden_size
    activation: str = "gelu_new"       # activation_function
    layer_norm_eps: float = 1e-5
    embd_dropout: float = 0.1          # embd_pdrop: after token + position embeddings
    attn_dropout: float = 0.1          # attn_pdrop: on attention probabilities
    resid_dropout: float = 0.1         # resid_pdrop: on each residual branch output
    initializer_range: float = 0.02    # stddev of fresh kernels
    tie_word_embeddings: bool = True   # LM head = token embedding (vocab_table)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def mlp_size(self) -> int:
        return self.mlp_hidden or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: dict) -> "GPT2Config":
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if d.get(key, ok) != ok:
                raise TenureError(f"config.json: {key}={d[key]!r} is not supported for gpt2 (need {ok})")
        activation = d.get("activation_function", "gelu_new")
        if activation not in ACTIVATIONS:
            raise TenureError(f"config.json: activation_function: {activation!r} is not supported")
        hidden = d.get("n_embd", d.get("hidden_size", 768))
        return cls(
            vocab_size=d["vocab_size"], max_positions=d.get("n_positions", 1024), hidden_size=hidden,
            num_layers=d.get("n_layer", 12), num_heads=d.get("n_head", 12), mlp_hidden=d.get("n_inner"),
            activation=activation, layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
            embd_dropout=d.get("embd_pdrop", 0.1), attn_dropout=d.get("attn_pdrop", 0.1),
            resid_dropout=d.get("resid_pdrop", 0.1), initializer_range=d.get("initializer_range", 0.02),
            tie_word_embeddings=d.get("tie_word_embeddings", True), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": self.vocab_size,
            "n_positions": self.max_positions, "n_embd": self.hidden_size, "n_layer": self.num_layers,
            "n_head": self.num_heads, "n_inner": self.mlp_hidden, "activation_function": self.activation,
            "layer_norm_epsilon": self.layer_norm_eps, "embd_pdrop": self.embd_dropout,
            "attn_pdrop": self.attn_dropout, "resid_pdrop": self.resid_dropout,
            "initializer_range": self.initializer_range, "tie_word_embeddings": self.tie_word_embeddings,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


def _expand_lora(lora: LoRASpec | None) -> LoRASpec | None:
    """HF's "c_attn" target names the fused qkv projection; here it is three Dense layers."""
    if lora is None or "c_attn" not in lora.targets:
        return lora
    return dataclasses.replace(lora, targets=tuple(lora.targets) + ("c_attn_q", "c_attn_k", "c_attn_v"))


class GPT2Embeddings(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.initializers.normal(self.config.initializer_range)
        self.token = self.param("token", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (self.config.vocab_size, self.config.hidden_size), jnp.float32)
        self.position = self.param("position", nn.with_logical_partitioning(init, ("position", "embed")),
                                   (self.config.max_positions, self.config.hidden_size), jnp.float32)

    def __call__(self, input_ids_BxL, positions_BxL):
        x_BxLxD = jnp.take(self.token, input_ids_BxL, axis=0) + jnp.take(
            self.position, positions_BxL, axis=0, mode="clip")
        return x_BxLxD.astype(self.dtype)

    def vocab_table(self):
        return self.token.astype(self.dtype)


class GPT2Block(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32
    lora: LoRASpec | None = None
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x_BxLxD, mask_Bx1xLxS, positions_BxL, deterministic: bool = True,
                 layer_cache: LayerCache | None = None):
        """-> x_BxLxD, or (x_BxLxD, layer_cache) when decoding with a cache (MultiHeadAttention)."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        h_BxLxD = LayerNorm(cfg.layer_norm_eps, self.dtype, name="attn_norm")(x_BxLxD)
        attended = MultiHeadAttention(
            num_heads=cfg.num_heads, head_dim=cfg.head_dim, qkv_bias=True, out_bias=True,
            dropout_rate=cfg.attn_dropout, dtype=self.dtype, kernel_init=init, lora=self.lora,
            names=("c_attn_q", "c_attn_k", "c_attn_v", "c_proj"), attention=self.attention, name="attn",
        )(h_BxLxD, mask_Bx1xLxS, positions_BxL, deterministic, layer_cache)
        h_BxLxD, layer_cache = (attended, None) if layer_cache is None else attended
        x_BxLxD = x_BxLxD + Dropout(cfg.resid_dropout)(h_BxLxD, deterministic=deterministic)
        h_BxLxD = LayerNorm(cfg.layer_norm_eps, self.dtype, name="mlp_norm")(x_BxLxD)
        h_BxLxD = Mlp(cfg.mlp_size, cfg.activation, True, self.dtype, init, self.lora,
                      names=("c_fc", "c_proj"), name="mlp")(h_BxLxD, deterministic)
        x_BxLxD = x_BxLxD + Dropout(cfg.resid_dropout)(h_BxLxD, deterministic=deterministic)
        return x_BxLxD if layer_cache is None else (x_BxLxD, layer_cache)


class GPT2Decoder(nn.Module):
    """`__call__(input_ids, attention_mask, token_type_ids=None, segment_ids=None, positions=None,
    deterministic=True) -> hidden_BxLxD` (after ln_f); `vocab_table() -> [V, D]` (the tied LM head).

    token_type_ids are ignored: GPT-2 has no segment embedding (HF's optional reuse of wte for
    them is not part of the GPT-2 tokenizer's outputs). Positions default to the index of each
    token among the real tokens of its segment, so left padding does not shift them.
    Each stage's output is sown to "intermediates"/"hidden_states" (embeddings, layers_0, ...).
    scan_layers runs the layers under jax.lax.scan (tenure.models.layer_scan): same params, same outputs,
    one compiled layer body. `init_cache` / `decode` run it with a KV cache (tenure.models.generate).
    """

    config: GPT2Config
    dtype: Any = jnp.float32         # compute dtype; params stay fp32
    frozen_prefix: int = 0           # leading stages [embeddings, layers_0, ...] run forward-only
    remat: str = "none"              # none | full | dots
    lora: LoRASpec | None = None
    attention: str = "einsum"        # einsum | xla | cudnn (tenure.models.layers.MultiHeadAttention)
    scan_layers: bool = False        # layers under jax.lax.scan (tenure.models.layer_scan)

    def setup(self):
        cfg = self.config
        block = remat_module(GPT2Block, self.remat, static_argnums=(4,))
        self.embeddings = GPT2Embeddings(cfg, self.dtype)
        self.embed_dropout = Dropout(cfg.embd_dropout)
        self.layers = [block(cfg, self.dtype, _expand_lora(self.lora), self.attention) for _ in range(cfg.num_layers)]
        self.final_norm = LayerNorm(cfg.layer_norm_eps, self.dtype)

    def _stage_out(self, stage: int, x_BxLxD):
        self.sow("intermediates", "hidden_states", x_BxLxD)
        if stage == self.frozen_prefix - 1:
            return jax.lax.stop_gradient(x_BxLxD)
        return layer_boundary(x_BxLxD)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, segment_ids=None, positions=None,
                 deterministic: bool = True):
        del token_type_ids
        if input_ids.shape[1] > self.config.max_positions:
            raise TenureError(f"data: sequence length {input_ids.shape[1]} exceeds the model's "
                              f"n_positions={self.config.max_positions} (lower the max length)")
        segments_BxL = attention_mask if segment_ids is None else segment_ids
        positions_BxL = positions_from_segments(segments_BxL) if positions is None else positions
        mask_Bx1xLxL = segment_mask(segments_BxL, causal=True)
        x_BxLxD = self.embed_dropout(self.embeddings(input_ids, positions_BxL), deterministic=deterministic)
        x_BxLxD = self._stage_out(0, x_BxLxD)
        if self.scan_layers and not self.is_initializing():
            x_BxLxD = self._scanned_layers(x_BxLxD, mask_Bx1xLxL, positions_BxL, deterministic)
        else:
            for i, layer in enumerate(self.layers):
                x_BxLxD = self._stage_out(i + 1, layer(x_BxLxD, mask_Bx1xLxL, positions_BxL, deterministic))
        return self.final_norm(x_BxLxD)

    def _scanned_layers(self, x_BxLxD, mask_Bx1xLxL, positions_BxL, deterministic):
        """The unrolled loop as one scan per piece of layer_ranges (init creates the params unrolled)."""
        layer = GPT2Block(self.config, self.dtype, _expand_lora(self.lora), self.attention, parent=None)
        apply_layer = lambda params, x, _, rngs: layer.apply({"params": params}, x, mask_Bx1xLxL, positions_BxL,
                                                            deterministic, rngs=rngs)
        for layer_range in layer_ranges(self.config.num_layers, self.frozen_prefix):
            params_N = stack_layer_params(self.variables["params"], layer_range)
            x_BxLxD, outputs_NxBxLxD = scan_layers(
                apply_layer, params_N, x_BxLxD, dropout_key=dropout_key_of(self, deterministic), remat=self.remat,
                keep_outputs=self.is_mutable_collection("intermediates"))
            if outputs_NxBxLxD is not None:  # sown stage by stage, as unrolled; _stage_out sows the last
                for output_BxLxD in outputs_NxBxLxD[:-1]:
                    self.sow("intermediates", "hidden_states", output_BxLxD)
            x_BxLxD = self._stage_out(layer_range.stop, x_BxLxD)
        return x_BxLxD

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache of `length` slots per row, in the compute dtype (for `decode`)."""
        cfg = self.config
        if length > cfg.max_positions:
            raise TenureError(f"generation: prompt + new tokens need {length} positions; this gpt2 model has "
                              f"n_positions={cfg.max_positions} (shorten the prompt or max_new_tokens)")
        return KVCache.empty(cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim, self.dtype)

    def decode(self, input_ids_BxL, attention_mask_BxL, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run L new tokens per row after the ones in `cache` (a prompt, then one token at a time):
        (hidden_BxLxD after ln_f, the cache with their keys and values). Positions and masks are
        those `__call__` computes on the whole sequence. The layers run unrolled even under
        scan_layers (a scanned step would copy the stacked params every token)."""
        cache, positions_BxL, _, mask_Bx1xLxT = cache.extend(attention_mask_BxL)
        x_BxLxD = self.embeddings(input_ids_BxL, positions_BxL)
        layer_caches = []
        for i, layer in enumerate(self.layers):
            x_BxLxD, layer_cache = layer(x_BxLxD, mask_Bx1xLxT, positions_BxL, True, cache.layer(i))
            layer_caches.append(layer_cache)
        return self.final_norm(x_BxLxD), cache.with_layers(layer_caches, input_ids_BxL.shape[1])

    def vocab_table(self):
        """The tied LM head: the token embedding [V, D] in the compute dtype."""
        return self.embeddings.vocab_table()

    def attend(self, hidden_BxLxD):
        """Logits [B, L, V] (fp32) of the tied LM head."""
        return vocab_logits(hidden_BxLxD, self.vocab_table())
