"""Greedy decoding with and without the KV cache (tenure.models.generate) on a model with SmolLM2-135M's
shapes (Llama: 30 layers, width 576, MLP 1536, 9 query / 3 KV heads, vocabulary 49,152, RoPE theta
1e5, tied embeddings) and random weights; the time does not depend on the weights' values.

    .venv/bin/python scripts/bench_generate.py                       # 64 prompts x 32 new tokens
    .venv/bin/python scripts/bench_generate.py --no-reference        # the cache path only

Prompts are 32-64 random tokens, left-padded to 64. Each path is compiled ahead of time (trace +
XLA compile, timed), then run: the cache path `--repeats` times (the median is reported), the
no-cache path once (it takes minutes). Prints a JSON line after the cache path and one at the
end with both paths, the speed-up and whether they gave the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tenure.models.generate import _greedy_loop, _stop_table  # noqa: E402
from tenure.models.llama import LlamaConfig  # noqa: E402
from tenure.models.rope import RopeSpec  # noqa: E402
from tenure.models.tasks import build_task_model  # noqa: E402

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                           rope=RopeSpec(theta=100000.0), tie_word_embeddings=True)


def random_params(model, batch: dict, seed: int) -> dict:
    """Params of the model's shapes drawn in numpy (N(0, 0.02), norm scales 1): no init compile."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    draw = lambda path, leaf: (np.ones(leaf.shape, np.float32) if path[-1].key == "scale"
                               else (0.02 * rng.standard_normal(leaf.shape, np.float32)))
    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


def time_path(model, params, ids, mask, new_tokens: int, use_cache: bool, repeats: int) -> tuple[dict, np.ndarray]:
    stops, lengths = _stop_table((), (), new_tokens)
    args = (params, jnp.asarray(ids), jnp.asarray(mask), stops, lengths, jnp.int32(0))
    start = time.perf_counter()
    lowered = _greedy_loop.lower(*args, model=model, max_new_tokens=new_tokens, use_cache=use_cache)
    traced = time.perf_counter()
    compiled = lowered.compile()
    compile_done = time.perf_counter()
    runs = []
    for _ in range(repeats):
        run_start = time.perf_counter()
        tokens = np.asarray(compiled(*args))
        runs.append(time.perf_counter() - run_start)
    return {"trace_s": round(traced - start, 2), "compile_s": round(compile_done - traced, 2),
            "run_s": round(statistics.median(runs), 2), "runs_s": [round(r, 2) for r in runs]}, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-length", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the cache path (median reported)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-reference", action="store_true", help="skip the no-cache path")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    ids = np.zeros((args.prompts, args.max_length), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(rng.integers(args.min_length, args.max_length + 1, args.prompts)):
        ids[row, args.max_length - length:] = rng.integers(1, SMOLLM2_135M.vocab_size, length)
        mask[row, args.max_length - length:] = 1
    model = build_task_model(SMOLLM2_135M, "causal_lm", dtype=jnp.dtype(args.dtype))
    params = random_params(model, {"input_ids": ids, "attention_mask": mask}, seed=1)

    result = {"prompts": args.prompts, "new_tokens": args.new_tokens,
              "prompt_lengths": [args.min_length, args.max_length], "dtype": args.dtype}
    result["cache"], cached = time_path(model, params, ids, mask, args.new_tokens, True, args.repeats)
    print(json.dumps(result), flush=True)  # the no-cache path takes minutes more
    if not args.no_reference:
        result["no_cache"], reference = time_path(model, params, ids, mask, args.new_tokens, False, 1)
        result["speedup_run"] = round(result["no_cache"]["run_s"] / result["cache"]["run_s"], 1)
        result["same_tokens"] = bool(np.array_equal(cached, reference))
    result["load_average"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
