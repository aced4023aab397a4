"""Where a bench config's train step spends its time, per XLA op (thunk), from a profiler trace.

    .venv/bin/python scripts/profile_step.py configs/bench/minilm.yaml [key=value ...] [--steps 3] [--top 30]

Builds the step as `tenure bench` does, runs two untimed steps, traces `--steps` more with
jax.profiler (a Perfetto trace, kept in --trace-dir), and prints the time per step of XLA's
executed ops grouped by HLO op name with layer numbers folded (layers_3 -> layers_N), the
fusion kind and the output shape, largest first. Times are thunk times: ops that run
concurrently on the host's threads each count in full, so the total can exceed the step time.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import time
from pathlib import Path

import jax

from tenure.engine.tools.bench import load_bench_config
from tenure.engine.tools.bench_setup import build_bench

HLO_OP = re.compile(r"^\s*%([\w.\-]+) = (\S+) [\w-]+\(.*?op_name=\"([^\"]*)\"", re.M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--trace-dir", default="/tmp/tenure-profile")
    args = parser.parse_args()

    cfg, bench = load_bench_config(args.config, args.overrides)
    b = build_bench(cfg, bench, Path(args.config))
    batches = b.device_batches()
    compiled = b.step_fn.lower(b.state, batches[0]).compile()
    state = b.state
    for i in range(2 + args.steps):
        if i == 2:
            jax.profiler.start_trace(args.trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            print(f"step {i - 2}: {time.perf_counter() - start:.3f} s")
    jax.profiler.stop_trace()

    trace = sorted(Path(args.trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)[-1]
    per_op = collections.defaultdict(float)
    for event in json.load(gzip.open(trace))["traceEvents"]:
        if event.get("ph") == "X":
            per_op[event["name"]] += event.get("dur", 0) / 1e3 / args.steps
    groups = collections.defaultdict(float)
    for name, shape, op in HLO_OP.findall(compiled.as_text()):
        kind = re.sub(r"[._]\d+$", "", name)
        where = re.sub(r"layers_\d+", "layers_N", op.split("jit(train_step)/")[-1])
        groups[(kind, shape, where)] += per_op.get(name, 0.0)
    total = sum(groups.values())
    print(f"XLA ops: {total:.0f} ms of thunk time per step")
    for (kind, shape, where), ms in sorted(groups.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms:9.1f} ms {100 * ms / total:5.1f}%  {kind:26} {shape:32} {where[:110]}")


if __name__ == "__main__":
    main()
