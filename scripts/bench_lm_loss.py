"""Micro-benchmark behind docs/performance.md: the causal-LM loss of GPT-2 124M's tied head,
forward + backward (gradients for the hidden states and the [V, D] table), 8 x 256 tokens.

    .venv/bin/python scripts/bench_lm_loss.py [TOKENS ...]     # tokens per chunk, default 256 512 1024

Cases: "full" (the logits [B, L, V] in fp32, log-softmax and autodiff, what the train step
did before tenure.engine.tasks.losses.vocab_ce), "full, fp32-out dot" (the same with the dot's output in
fp32, `preferred_element_type`, as the tied head computed bf16 logits before; bf16 only) and
"chunk N" (vocab_ce with LM_CHUNK_TOKENS = N: N / 8 positions of all 8 rows at a time), in
fp32 and in bf16 compute. All are compiled first with the train step's XLA options,
then run in turn (A B C A B C ...), and the median of each is printed.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tenure.engine.tasks import losses  # noqa: E402
from tenure.engine.runtime.xla_env import compiler_options  # noqa: E402
from tenure.models.heads import Vocab  # noqa: E402
from tenure.models.layers import vocab_logits  # noqa: E402
from scripts.bench_layer import interleave  # noqa: E402

ROWS, LENGTH, DIM, VOCAB = 8, 256, 768, 50257


def _fp32_out_logits(hidden, table):
    return jnp.einsum("bld,vd->blv", hidden, table, preferred_element_type=jnp.float32)


def case(dtype, chunk: int | None, fp32_out: bool = False):
    """A compiled fn(hidden, table, labels) -> (loss, grads) and its arguments."""
    key_h, key_t, key_l = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(key_h, (ROWS, LENGTH, DIM)).astype(dtype)
    table = (0.02 * jax.random.normal(key_t, (VOCAB, DIM))).astype(dtype)
    labels = jax.random.randint(key_l, (ROWS, LENGTH), 0, VOCAB)
    batch = {"labels": labels, "example_mask": jnp.ones((ROWS,), jnp.float32)}

    def loss(hidden, table, labels):
        b = dict(batch, labels=labels)
        if chunk is not None:
            outputs = {"vocab": Vocab(hidden, table, None)}
        else:
            outputs = {"logits": (_fp32_out_logits if fp32_out else vocab_logits)(hidden, table)}
        return losses.causal_lm({}, outputs, b, {})[0]

    losses.LM_CHUNK_TOKENS = chunk or losses.LM_CHUNK_TOKENS   # read when the loss is traced (below)
    fn = jax.jit(jax.value_and_grad(loss, (0, 1)), compiler_options=compiler_options("cpu"))
    return fn.lower(hidden, table, labels).compile(), (hidden, table, labels)


def main(chunks: list[int]) -> None:
    cases = []
    for dtype in (jnp.float32, jnp.bfloat16):
        if dtype == jnp.bfloat16:
            cases.append(("bfloat16 full, fp32-out dot", *case(dtype, None, fp32_out=True)))
        for chunk in [None, *chunks]:
            fn, args = case(dtype, chunk)
            cases.append((f"{jnp.dtype(dtype).name} {'full' if chunk is None else f'chunk {chunk}'}", fn, args))
    for name, seconds in interleave(cases, rounds=5).items():
        print(f"{name:28} {1000 * seconds:8.0f} ms")


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [256, 512, 1024])
