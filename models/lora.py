"""LoRA adapters: the spec, merging adapters into kernels, and extracting adapter weights.

A `tenure.models.layers.Dense` whose module name is in `LoRASpec.targets` gets two extra leaves,
`lora_a` [in, r] and `lora_b` [r, out]; its output is `x @ kernel + (x @ lora_a @ lora_b) * scale`
with `scale = alpha / rank`. Merging folds `lora_a @ lora_b * scale` into `kernel`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Low-rank adapters on the Dense layers named in `targets`.

    rank: adapter rank r. alpha: scale numerator (scale = alpha / rank).
    targets: Dense module names, e.g. ("query", "value") for BERT, ("q_proj", "v_proj") for Llama.
    dropout: dropout on the adapter input while training (uses the "dropout" rng).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, dense_name: str | None) -> bool:
        return dense_name is not None and dense_name in self.targets


def _is_adapted(node: Any) -> bool:
    return isinstance(node, dict) and "lora_a" in node and "lora_b" in node and "kernel" in node


def merge_lora(params: Any, spec: LoRASpec) -> Any:
    """Return params with every adapter folded into its kernel and the lora leaves removed."""

    def walk(node):
        if not isinstance(node, dict):
            return node
        if _is_adapted(node):
            merged = {k: v for k, v in node.items() if k not in ("lora_a", "lora_b")}
            delta_IxO = (node["lora_a"].astype(jnp.float32) @ node["lora_b"].astype(jnp.float32)) * spec.scale
            merged["kernel"] = (node["kernel"].astype(jnp.float32) + delta_IxO).astype(node["kernel"].dtype)
            return merged
        return {k: walk(v) for k, v in node.items()}

    return walk(params)


def strip_lora(params: Any) -> Any:
    """Params without the adapter leaves (the frozen base weights)."""
    if not isinstance(params, dict):
        return params
    return {k: strip_lora(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}


def fresh_adapters_zeroed(params: Any) -> Any:
    """Params whose fresh adapters (`lora_b` all zero) have `lora_a` zeroed too. Such a layer adds
    exactly nothing to its frozen base whatever `lora_a` holds, so runs that differ only in the
    seed's draw of `lora_a` start from one model; the adapters' shapes stay (another rank compiles
    another program, whose rounding differs)."""
    if not isinstance(params, dict):
        return params
    fresh = "lora_b" in params and "lora_a" in params and not bool(jnp.any(params["lora_b"] != 0))
    return {k: jnp.zeros_like(v) if fresh and k == "lora_a" else fresh_adapters_zeroed(v) for k, v in params.items()}


def lora_only(params: Any) -> dict:
    """The adapter leaves only, keeping their paths: {"backbone": {"layers_0": {..."query": {"lora_a", "lora_b"}}}}."""

    def walk(node):
        if not isinstance(node, dict):
            return None
        out = {}
        for k, v in node.items():
            if k in ("lora_a", "lora_b"):
                out[k] = v
            else:
                sub = walk(v)
                if sub:
                    out[k] = sub
        return out

    return walk(params) or {}


def lora_paths(params: Any) -> list[tuple[str, ...]]:
    """Paths (tuples of keys) of the Dense modules that carry adapters."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(lora_only(params))[0]:
        keys = tuple(p.key for p in path)
        if keys[-1] == "lora_a":
            paths.append(keys[:-1])
    return paths
