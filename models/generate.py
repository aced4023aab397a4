"""Greedy decoding of a causal LM (a TaskModel of kind causal_lm), with a KV cache.

Prompts may be left- or right-padded (any mask with the real tokens in order): rows are first
left-aligned so that every row's next token goes to the same column. Positions are
`cumsum(mask) - 1` (0 on padding), as HF `generate` computes them, so learned-position models
(GPT-2) see the same positions as in HF.

With the cache (the default): one prefill runs the [B, L] prompt and writes every layer's keys
and values into a cache of L + max_new_tokens - 1 slots (tenure.models.layers.KVCache, [layers, B, T,
kv_heads, head_dim]; the last new token is never fed back); then a jitted while loop with static
shapes runs one token per row per step and projects only that position to logits [B, V]. The
loop ends when every row has ended.
`use_cache=False` is the reference the tests hold the cache to: every step re-runs the model on
the whole buffer (prompt + max_new_tokens) and computes [B, T, V] logits.

A row ends with a token in `eos_id`, or with the last token of a stop sequence: one of
`stop_sequences` (tuples of token ids) that the row's generated tokens end with (the prompt
never counts). The output keeps the ending token(s) and holds `pad_id` after them. A caller
stopping on strings (lm-eval's `until`) passes their tokenisations as stop sequences, to end rows
early, and still cuts the decoded text at the string: a model may spell a string with other
tokens than the stop sequence, and then the row runs on to max_new_tokens.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tenure.models.layers import KVCache, vocab_logits
from tenure.models.tasks import TaskModel


def left_align(ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's padding to the front, keeping the real tokens in order."""
    order_BxL = np.argsort(np.asarray(mask_BxL) != 0, axis=1, kind="stable")
    return np.take_along_axis(np.asarray(ids_BxL), order_BxL, 1), np.take_along_axis(np.asarray(mask_BxL), order_BxL, 1)


def _init_cache(model: TaskModel, batch: int, length: int) -> KVCache:
    return model.backbone.init_cache(batch, length)


def _decode_last(model: TaskModel, ids_BxL, mask_BxL, cache: KVCache):
    """(fp32 logits [B, V] of the last of the L new tokens, the cache with all L written)."""
    hidden_BxLxD, cache = model.backbone.decode(ids_BxL, mask_BxL, cache)
    vocab = model.head(hidden_BxLxD[:, -1:], model.backbone.vocab_table)
    return vocab_logits(*vocab)[:, 0], cache


def _with_cache(model, params, ids_BxL, mask_BxL, max_new_tokens):
    """(start, advance): start() -> (logits_BxV after the prompt, state); advance(state, token_B,
    t) feeds new token t - 1 and -> (logits_BxV after it, state)."""
    batch, prompt_len = ids_BxL.shape
    variables = {"params": params}

    def start():
        cache = model.apply(variables, batch, prompt_len + max_new_tokens - 1, method=_init_cache)
        return model.apply(variables, ids_BxL, mask_BxL, cache, method=_decode_last)

    def advance(cache, token_B, t):
        del t  # the cache knows its next slot
        return model.apply(variables, token_B[:, None], jnp.ones_like(token_B)[:, None], cache, method=_decode_last)

    return start, advance


def _without_cache(model, params, ids_BxL, mask_BxL, max_new_tokens):
    """`_with_cache`'s interface by re-running the model over the whole [B, L + N] buffer."""
    batch, prompt_len = ids_BxL.shape
    pad_BxN = jnp.zeros((batch, max_new_tokens), ids_BxL.dtype)
    buffer = (jnp.concatenate([ids_BxL, pad_BxN], axis=1), jnp.concatenate([mask_BxL, pad_BxN], axis=1))

    def logits_at(ids_BxT, mask_BxT, column):
        positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0).astype(jnp.int32)
        batch_dict = {"input_ids": ids_BxT, "attention_mask": mask_BxT, "positions": positions_BxT}
        logits_BxTxV = model.apply({"params": params}, batch_dict, deterministic=True)["logits"]
        return jax.lax.dynamic_index_in_dim(logits_BxTxV, column, axis=1, keepdims=False), (ids_BxT, mask_BxT)

    def start():
        return logits_at(*buffer, prompt_len - 1)

    def advance(buffer, token_B, t):
        column = prompt_len + t - 1
        ids_BxT = jax.lax.dynamic_update_index_in_dim(buffer[0], token_B, column, axis=1)
        mask_BxT = jax.lax.dynamic_update_index_in_dim(buffer[1], jnp.ones_like(token_B), column, axis=1)
        return logits_at(ids_BxT, mask_BxT, column)

    return start, advance


def _stop_table(eos_ids: tuple[int, ...], stop_sequences, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ending sequence (each EOS id is one of length 1) right-aligned in an int32 table [S, M]
    with its length [S] (0 in unused rows). S and M are rounded up to powers of two (at least 8)
    so that stop sets of similar sizes share one compiled loop; sequences longer than
    max_new_tokens, which can never complete, are left out."""
    sequences = list(dict.fromkeys([(int(e),) for e in eos_ids]
                                   + [tuple(int(i) for i in s) for s in stop_sequences if len(s) <= max_new_tokens]))
    bucket = lambda n: max(8, 1 << (n - 1).bit_length())
    width = bucket(max((len(s) for s in sequences), default=1))
    table_SxM = np.zeros((bucket(len(sequences)), width), np.int32)
    lengths_S = np.zeros(len(table_SxM), np.int32)
    for row, sequence in enumerate(sequences):
        table_SxM[row, width - len(sequence):] = sequence
        lengths_S[row] = len(sequence)
    return table_SxM, lengths_S


def _ends_row(new_BxN, t, stops_SxM, stop_lengths_S) -> jax.Array:
    """Bool [B]: the generated tokens [0, t] end with one of the stop sequences."""
    width = stops_SxM.shape[1]
    # The last `width` tokens up to t; -1 (no token id) stands before the first generated one.
    padded_BxMN = jnp.concatenate([jnp.full((new_BxN.shape[0], width), -1, new_BxN.dtype), new_BxN], axis=1)
    tail_BxM = jax.lax.dynamic_slice_in_dim(padded_BxMN, t + 1, width, axis=1)
    needed_SxM = jnp.arange(width)[None, :] >= width - stop_lengths_S[:, None]
    matches_BxSxM = (tail_BxM[:, None, :] == stops_SxM[None]) | ~needed_SxM[None]
    return jnp.any(jnp.all(matches_BxSxM, axis=2) & (stop_lengths_S > 0)[None], axis=1)


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "use_cache"))
def _greedy_loop(params, ids_BxL, mask_BxL, stops_SxM, stop_lengths_S, pad_id, *, model, max_new_tokens, use_cache):
    start, advance = (_with_cache if use_cache else _without_cache)(model, params, ids_BxL, mask_BxL, max_new_tokens)

    def emit(t, logits_BxV, new_BxN, done_B):
        token_B = jnp.where(done_B, pad_id, jnp.argmax(logits_BxV, axis=-1)).astype(new_BxN.dtype)
        new_BxN = jax.lax.dynamic_update_index_in_dim(new_BxN, token_B, t, axis=1)
        return token_B, new_BxN, done_B | _ends_row(new_BxN, t, stops_SxM, stop_lengths_S)

    def step(carry):
        t, token_B, state, new_BxN, done_B = carry
        # Finished rows go on feeding pad_id (as HF does); their output stays pad_id.
        logits_BxV, state = advance(state, token_B, t)
        token_B, new_BxN, done_B = emit(t, logits_BxV, new_BxN, done_B)
        return t + 1, token_B, state, new_BxN, done_B

    logits_BxV, state = start()
    batch = ids_BxL.shape[0]
    new_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    token_B, new_BxN, done_B = emit(0, logits_BxV, new_BxN, jnp.zeros((batch,), bool))
    carry = (jnp.int32(1), token_B, state, new_BxN, done_B)
    unfinished = lambda carry: (carry[0] < max_new_tokens) & ~jnp.all(carry[4])
    return jax.lax.while_loop(unfinished, step, carry)[3]


def greedy_generate(model: TaskModel, params, prompt_ids_BxL, prompt_mask_BxL, max_new_tokens: int,
                    eos_id: int | Sequence[int] | None, pad_id: int | None = None,
                    stop_sequences: Sequence[Sequence[int]] = (), use_cache: bool = True) -> np.ndarray:
    """New token ids [B, max_new_tokens] (int32) of argmax decoding: each row up to and including
    its first `eos_id` (one id or several) or completed stop sequence, then `pad_id` (default: the
    first eos id, else 0). `model` is a TaskModel of kind causal_lm and `params` its params; equal
    models share one compiled loop per prompt shape and max_new_tokens (EOS ids, stop sequences
    and pad_id are data, in tables of a few sizes: see _stop_table).
    `use_cache=False` runs the reference loop without a KV cache (same tokens, far slower)."""
    if model.kind != "causal_lm":
        raise ValueError(f"greedy_generate needs a causal_lm TaskModel, got kind {model.kind!r}")
    eos_ids = () if eos_id is None else ((eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id))
    if any(len(s) == 0 for s in stop_sequences):
        raise ValueError("greedy_generate: a stop sequence is empty")
    pad = pad_id if pad_id is not None else (int(eos_ids[0]) if eos_ids else 0)
    ids_BxL, mask_BxL = left_align(prompt_ids_BxL, prompt_mask_BxL)
    if max_new_tokens == 0:
        return np.zeros((len(ids_BxL), 0), np.int32)
    stops_SxM, stop_lengths_S = _stop_table(eos_ids, stop_sequences, max_new_tokens)
    new_BxN = _greedy_loop(params, jnp.asarray(ids_BxL, jnp.int32), jnp.asarray(mask_BxL, jnp.int32), stops_SxM,
                           stop_lengths_S, jnp.int32(pad), model=model, max_new_tokens=max_new_tokens,
                           use_cache=use_cache)
    return np.asarray(new_BxN)
