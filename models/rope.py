"""Decoder positions: rotary embeddings (RoPE) as HF Llama defines them (with "llama3" and
"linear" scaling), per-segment positions for padded and packed rows, and the sliding-window mask.

transformers v5 keeps RoPE settings in `config.rope_parameters` ({"rope_type", "rope_theta",
...}); older configs put `rope_theta` at top level and scaling in `rope_scaling` (whose
type key may be "type"). `RopeSpec.from_hf` reads both layouts; `to_hf` writes the v5 one.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tenure.models.errors import TenureError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """theta: base wavelength. rope_type: default | linear | llama3. factor: position scaling
    (linear, llama3). low/high_freq_factor, original_max_position_embeddings: llama3 band edges."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, d: dict) -> "RopeSpec":
        params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise TenureError(f"config.json: rope_parameters.rope_type: {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        spec = cls(theta=float(theta), rope_type=rope_type)
        if rope_type == "linear":
            spec = dataclasses.replace(spec, factor=float(params["factor"]))
        if rope_type == "llama3":
            original = params.get("original_max_position_embeddings", d.get("max_position_embeddings"))
            spec = dataclasses.replace(
                spec, factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(original))
        return spec

    def to_hf(self) -> dict:
        out = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        return out


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> np.ndarray:
    """[head_dim // 2] fp32 inverse frequencies, scaled as `spec.rope_type` says."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(spec.theta) ** exponents)).astype(np.float32)
    if spec.rope_type == "linear":
        return (inv_freq / np.float32(spec.factor)).astype(np.float32)
    if spec.rope_type == "llama3":
        # Long wavelengths (> original_len / low_freq_factor) are slowed by `factor`, short ones
        # (< original_len / high_freq_factor) kept, and the band between interpolated smoothly.
        old_len = spec.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / spec.low_freq_factor, inv_freq / spec.factor, inv_freq)
        smooth = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = (wavelen >= old_len / spec.high_freq_factor) & (wavelen <= old_len / spec.low_freq_factor)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate pairs (i, i + Dh/2) by angle position * inv_freq[i] (HF's rotate_half layout)."""
    angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_BxLxDh = jnp.concatenate([angles_BxLxF, angles_BxLxF], axis=-1)
    cos_BxLx1xDh = jnp.cos(angles_BxLxDh)[:, :, None, :]
    sin_BxLx1xDh = jnp.sin(angles_BxLxDh)[:, :, None, :]
    x32 = x_BxLxHxDh.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos_BxLx1xDh + rotated * sin_BxLx1xDh).astype(x_BxLxHxDh.dtype)


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
    """Index of each token within its segment (0, 1, ...), 0 on padding (segment 0).

    With segment_ids = attention_mask this is HF generate's `cumsum(mask) - 1`, so left- and
    right-padded rows get the same positions for their real tokens."""
    seg_BxL = jnp.asarray(segment_ids_BxL)
    length = seg_BxL.shape[1]
    earlier_same_BxLxL = (seg_BxL[:, :, None] == seg_BxL[:, None, :]) & jnp.tril(
        jnp.ones((length, length), dtype=bool))[None]
    count_BxL = earlier_same_BxLxL.sum(-1) - 1
    return jnp.where(seg_BxL != 0, count_BxL, 0).astype(jnp.int32)


def sliding_window_mask(positions_BxL: jax.Array, window: int,
                        key_positions_BxS: jax.Array | None = None) -> jax.Array:
    """Bool [B, 1, L, S]: key within `window` tokens of the query (HF Mistral: q - k < window).
    Keys are the queries themselves (S = L) unless `key_positions_BxS` is given (a KV cache's slots).
    Positions count tokens inside a segment, so this equals HF's index distance on real tokens."""
    pos_BxL = jnp.asarray(positions_BxL)
    key_pos_BxS = pos_BxL if key_positions_BxS is None else jnp.asarray(key_positions_BxS)
    return ((pos_BxL[:, :, None] - key_pos_BxS[:, None, :]) < window)[:, None]
