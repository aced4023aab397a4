"""Micro-benchmarks behind docs/performance.md: dot layouts and one BERT-base layer, interleaved.

    .venv/bin/python scripts/bench_layer.py dots      # [2048x768]x[768x3072] forward vs weight-gradient dots
    .venv/bin/python scripts/bench_layer.py layer     # one BERT-base layer fwd+bwd, 16 x 128, with dropout

Every case is compiled first, then all cases run in turn (A B C A B C ...) and the median of
each is printed, so a shared, noisy host affects every case alike. XLA options are passed per
jit (`compiler_options`), as engine/train/step.py does.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from tenure.engine.runtime.xla_env import ONEDNN_OPTIONS  # noqa: E402

CUSTOM_CALL_ONLY = {"xla_cpu_experimental_onednn_custom_call": True}


def interleave(cases, rounds: int = 5) -> dict[str, float]:
    for _, fn, args in cases:
        jax.block_until_ready(fn(*args))
    times = {name: [] for name, _, _ in cases}
    for _ in range(rounds):
        for name, fn, args in cases:
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def dots() -> None:
    m, k, n = 2048, 768, 3072
    forward = (((1,), (0,)), ((), ()))      # x @ W
    weight_grad = (((0,), (0,)), ((), ()))  # x^T @ dy
    cases = []
    for dtype in (jnp.bfloat16, jnp.float32):
        key = jax.random.key(0)
        x = jax.random.normal(key, (m, k)).astype(dtype)
        w = jax.random.normal(key, (k, n)).astype(dtype)
        dy = jax.random.normal(key, (m, n)).astype(dtype)
        for label, options in (("xla default", {}), ("onednn", ONEDNN_OPTIONS)):
            cases.append((f"{dtype.__name__} x@W {label}",
                          jax.jit(lambda a, b: lax.dot_general(a, b, forward), compiler_options=options), (x, w)))
            cases.append((f"{dtype.__name__} x^T@dy {label}",
                          jax.jit(lambda a, b: lax.dot_general(a, b, weight_grad), compiler_options=options), (x, dy)))
    for name, seconds in interleave(cases, rounds=7).items():
        print(f"{name:32} {2 * m * k * n / seconds / 1e9:8.0f} GFLOP/s")


def layer() -> None:
    import flax.linen as nn
    from tenure.models import layers
    from tenure.models.bert import BertConfig, BertLayer
    cfg, batch, length = BertConfig(), 16, 128
    x = jax.random.normal(jax.random.key(0), (batch, length, cfg.hidden_size))
    mask = layers.attention_mask(jnp.ones((batch, length), jnp.int32))
    variants = {"fp32 xla default": ("float32", {}), "fp32 onednn": ("float32", ONEDNN_OPTIONS),
                "bf16 xla default": ("bfloat16", {}), "bf16 onednn custom calls only": ("bfloat16", CUSTOM_CALL_ONLY),
                "bf16 onednn": ("bfloat16", ONEDNN_OPTIONS)}
    cases = []
    for name, (dtype, options) in variants.items():
        module = BertLayer(cfg, jnp.dtype(dtype))
        params = nn.unbox(module.init(jax.random.key(1), x, mask, True)["params"])

        def loss(p, h, key, module=module, dtype=dtype):
            out = module.apply({"params": p}, h.astype(dtype), mask, False, rngs={"dropout": key})
            return out.astype(jnp.float32).sum()

        cases.append((name, jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options),
                      (params, x, jax.random.key(2))))
    result = interleave(cases)
    base = result["fp32 xla default"]
    for name, seconds in result.items():
        print(f"{name:32} {seconds * 1e3:8.0f} ms   {base / seconds:5.2f}x vs fp32 xla default")


if __name__ == "__main__":
    {"dots": dots, "layer": layer}[sys.argv[1] if len(sys.argv) > 1 else "layer"]()
