"""Greedy decoding without a KV cache: every step re-runs the model on the whole fixed-length
buffer (prompt + max_new_tokens), so one compiled program serves every step.

Prompts may be left- or right-padded (any mask with the real tokens in order): rows are first
left-aligned so that every row's next token goes to the same column. Positions are
`cumsum(mask) - 1` (0 on padding), as HF `generate` computes them, so learned-position models
(GPT-2) see the same positions as in HF. Rows that emitted `eos_id` are filled with `pad_id`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# apply_logits_fn(params, input_ids_BxT, attention_mask_BxT, positions_BxT) -> logits_BxTxV
LogitsFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def left_align(ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's padding to the front, keeping the real tokens in order."""
    order_BxL = np.argsort(np.asarray(mask_BxL) != 0, axis=1, kind="stable")
    return np.take_along_axis(np.asarray(ids_BxL), order_BxL, 1), np.take_along_axis(np.asarray(mask_BxL), order_BxL, 1)


@partial(jax.jit, static_argnames=("apply_logits_fn", "max_new_tokens", "eos_id", "pad_id"))
def _greedy_loop(params, ids_BxL, mask_BxL, *, apply_logits_fn, max_new_tokens, eos_id, pad_id):
    batch, prompt_len = ids_BxL.shape
    ids_BxT = jnp.concatenate([ids_BxL, jnp.full((batch, max_new_tokens), pad_id, ids_BxL.dtype)], axis=1)
    mask_BxT = jnp.concatenate([mask_BxL, jnp.zeros((batch, max_new_tokens), mask_BxL.dtype)], axis=1)

    def step(t, carry):
        ids_BxT, mask_BxT, done_B = carry
        positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0).astype(jnp.int32)
        logits_BxTxV = apply_logits_fn(params, ids_BxT, mask_BxT, positions_BxT)
        last_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, prompt_len - 1 + t, axis=1, keepdims=False)
        next_B = jnp.where(done_B, pad_id, jnp.argmax(last_BxV, axis=-1)).astype(ids_BxT.dtype)
        column = prompt_len + t
        ids_BxT = jax.lax.dynamic_update_index_in_dim(ids_BxT, next_B, column, axis=1)
        # Like HF, the mask grows by one real token per step for every row, finished or not.
        mask_BxT = jax.lax.dynamic_update_index_in_dim(mask_BxT, jnp.ones_like(next_B, mask_BxT.dtype), column, 1)
        if eos_id is not None:
            done_B = done_B | (next_B == eos_id)
        return ids_BxT, mask_BxT, done_B

    done_B = jnp.zeros((batch,), bool)
    ids_BxT, _, _ = jax.lax.fori_loop(0, max_new_tokens, step, (ids_BxT, mask_BxT, done_B))
    return ids_BxT[:, prompt_len:]


def greedy_generate(apply_logits_fn: LogitsFn, params, prompt_ids_BxL, prompt_mask_BxL, max_new_tokens: int,
                    eos_id: int | None, pad_id: int | None = None) -> np.ndarray:
    """New token ids [B, max_new_tokens] (int32): argmax decoding, `pad_id` (default `eos_id`)
    after a row's first `eos_id`. `apply_logits_fn` must be the same object across calls to
    reuse the compiled loop (it is a static argument of the jit)."""
    ids_BxL, mask_BxL = left_align(prompt_ids_BxL, prompt_mask_BxL)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    new_BxN = _greedy_loop(params, jnp.asarray(ids_BxL, jnp.int32), jnp.asarray(mask_BxL, jnp.int32),
                           apply_logits_fn=apply_logits_fn, max_new_tokens=max_new_tokens, eos_id=eos_id,
                           pad_id=pad)
    return np.asarray(new_BxN)
