"""Transformer layers under one `jax.lax.scan` (model.scan_layers) instead of an unrolled loop.

Unrolled, JAX traces and XLA optimises every layer's forward and backward separately, so
compile time grows with depth; scanned, there is one layer body. The parameter tree does not
change (HF mapping, trainability regexes, LoRA, checkpoints and EWC see `layers_0`,
`layers_1`, ...): at call time the per-layer subtrees are stacked on a leading layer axis, and
each scan step applies a single, unbound layer module to its slice with `Module.apply`. The
price is a copy of the parameters into the stack and of the gradients out of it every step.
On XLA:CPU, which compiles identical kernels once anyway, only tracing and lowering get faster
(docs/performance.md, "Layers under scan").

    ranges = layer_ranges(num_layers, frozen_prefix)
    params_N = stack_layer_params(self.variables["params"], ranges[0])
    x_BxLxD, outputs_NxBxLxD = scan_layers(apply_layer, params_N, x_BxLxD,
                                           dropout_key=dropout_key_of(self, deterministic), remat=self.remat)

`init` still runs the unrolled loop (it creates the per-layer params); the backbones decide.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tenure.models.layers import REMAT_POLICIES

# apply_layer(params_i, x_BxLxD, per_layer_i, rngs) -> x_BxLxD: one layer, applied functionally.
# per_layer_i is the layer's slice of scan_layers' `per_layer_N` (None when not given).
LayerFn = Callable[[Any, jax.Array, Any, dict], jax.Array]


def layer_ranges(num_layers: int, frozen_prefix: int) -> list[range]:
    """Layer indices scanned as one piece each: the layers inside the frozen prefix, then the
    rest. Stages are [embeddings, layers_0, ...], so the frozen layers end at stage
    `frozen_prefix - 1`; the backbone stops the gradient there and XLA skips their backward."""
    split = min(max(frozen_prefix - 1, 0), num_layers)
    return [layers for layers in (range(0, split), range(split, num_layers)) if len(layers)]


def stack_layer_params(params: dict, layers: range) -> Any:
    """The subtrees params["layers_{i}"] for i in `layers`, stacked leaf by leaf on a new axis 0."""
    trees = [nn.unbox(params[f"layers_{i}"]) for i in layers]
    # The barrier's transpose is a barrier on the gradients: each layer's gradient is sliced out
    # on its own, and the optimizer's per-leaf updates stay plain elementwise kernels that XLA
    # fuses across leaves (with the slices inside them, the 32-layer bench step compiled 2x slower).
    return jax.tree.map(lambda *leaves: jnp.stack(jax.lax.optimization_barrier(leaves)), *trees)


def dropout_key_of(module: nn.Module, deterministic: bool) -> jax.Array | None:
    """A fresh key from `module`'s "dropout" rng stream when this call may draw dropout, else None
    (deterministic, or no stream given, as for a model whose dropout rates are all 0)."""
    return None if deterministic or not module.has_rng("dropout") else module.make_rng("dropout")


def scan_layers(apply_layer: LayerFn, params_N: Any, x_BxLxD: jax.Array, per_layer_N: Any = None, *,
                dropout_key: jax.Array | None = None, remat: str = "none",
                keep_outputs: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Apply the N stacked layers in order. Returns (output, every layer's output [N, B, L, D]
    when `keep_outputs`, else None).

    dropout_key: split into one "dropout" rng per layer (None when deterministic).
    remat: "none" | "full" | "dots", as tenure.models.layers.remat_module, on the scanned body."""
    num_layers = jax.tree.leaves(params_N)[0].shape[0]
    keys_N = None if dropout_key is None else jax.random.split(dropout_key, num_layers)

    def body(x_BxLxD, layer_slice):
        params_i, per_layer_i, key_i = layer_slice
        rngs = {} if key_i is None else {"dropout": key_i}
        y_BxLxD = apply_layer(params_i, x_BxLxD, per_layer_i, rngs)
        return y_BxLxD, y_BxLxD if keep_outputs else None

    if remat != "none":
        # Inside a scan, CSE cannot undo the recomputation, so its costly barriers are not needed.
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x_BxLxD, (params_N, per_layer_N, keys_N))
