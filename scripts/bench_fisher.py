"""Throughput of the diagonal Fisher pass against the train step, on one config's real model.

    .venv/bin/python scripts/bench_fisher.py                                 # quickstart MiniLM
    .venv/bin/python scripts/bench_fisher.py --modes sampled empirical --chunks 4 8 16
    .venv/bin/python scripts/bench_fisher.py configs/tasks/seq_cls.yaml data.max_length=64
    .venv/bin/python scripts/bench_fisher.py configs/forgetting/split_lexnames.yaml --stage-examples 64 128

`--stage-examples N ...` times instead the pass a stage takes: the exact / sampled / ... Fisher of the
config's first task over N of its training records, batched as `ewc.examples: N` batches them
(tenure.engine.continual.stage_regularizers), twice each after one warm-up, with that task's classes.

Prints examples/s of the jitted train step and of `tenure.engine.continual.fisher.make_fisher_step` for each
mode and chunk, on the same pipeline batches (taken beforehand: data time excluded), after one
warm-up call per batch shape (compile time excluded), and the Fisher / train ratio. Issue 7's
target: sampled / empirical >= 0.30 of training, exact >= 0.30 / number of classes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from tenure.engine.config.schema import load_config  # noqa: E402
from tenure.engine.data.pipeline import to_global_batch  # noqa: E402
from tenure.engine.train.build import build_stage  # noqa: E402
from tenure.engine.continual.fisher import make_fisher_step, prune  # noqa: E402
from tenure.engine.continual.regularizers import ewc_extra, ewc_term  # noqa: E402
from tenure.engine.train.trainer import Trainer  # noqa: E402


def timed(call, batches) -> tuple[float, float]:
    """(wall, process CPU) seconds for one pass over `batches`, each distinct shape compiled first.
    CPU seconds (all threads of this process) are the steadier figure on a shared machine."""
    warmed = set()
    out = None
    for batch in batches:
        if batch["input_ids"].shape not in warmed:
            warmed.add(batch["input_ids"].shape)
            out = call(batch)
    jax.block_until_ready(out)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        out = call(batch)
    jax.block_until_ready(out)
    return time.perf_counter() - wall, time.process_time() - cpu


def line(name: str, examples: int, seconds: tuple[float, float]) -> str:
    return (f"{name:24s}: {examples / seconds[0]:8.1f} examples/s wall, "
            f"{examples / seconds[1]:8.1f} examples per CPU-second")


def stage_pass(trainer: Trainer, counts: list[int]) -> None:
    """Seconds of the Fisher pass the second stage takes (its `ewc.fisher` mode, the first task's
    classes) over each count of the first task's records."""
    from tenure.engine.continual.fisher import fisher_diagonal
    from tenure.engine.continual.stage_regularizers import _fisher_batches, fisher_head
    sr = trainer.build(0, trainer.start_params, {})
    sr.train_iter.close()
    name = next(iter(trainer.tasks.by_name))
    index = min(1, len(trainer.stages) - 1)
    mode = trainer.stages[index].ewc.fisher
    _, classes = fisher_head(trainer.cfg, trainer.tasks, trainer.stages, index, name)
    step = make_fisher_step(sr.model, trainer.tasks.first.task.spec.kind, mode, sr.trainability.trainable_mask,
                            trainer.backbone.mesh, sr.state_shardings.params, classes=classes)
    for count in counts:
        batches = list(_fisher_batches(trainer.backbone, trainer.tasks, name, count, 0, "ewc.examples"))
        rows = [int(b["input_ids"].shape[0]) for b in batches]
        times = []
        for _ in range(3):   # the first call compiles
            start = time.perf_counter()
            fisher, n = fisher_diagonal(step, sr.state.params, batches, jax.random.key(0), max_examples=count)
            jax.block_until_ready(fisher)
            times.append(time.perf_counter() - start)
        print(f"fisher {mode} of task {name}, {n} examples in batches of {rows} rows, {len(classes or ())} classes: "
              f"{times[1]:.2f} s, {times[2]:.2f} s (first call, with its compile: {times[0]:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tasks/seq_cls.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--batches", type=int, default=8, help="timed batches")
    parser.add_argument("--modes", nargs="+", default=["sampled", "empirical", "batched", "exact"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[8])
    parser.add_argument("--ewc", action="store_true", help="also time the train step with an EWC term")
    parser.add_argument("--exact-batches", type=int, default=1, help="timed batches for exact (C x slower)")
    parser.add_argument("--stage-examples", nargs="+", type=int, help="time a stage's Fisher pass over N records")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    if args.stage_examples:
        stage_pass(trainer, args.stage_examples)
        return
    sr = trainer.build(0, trainer.start_params, {})   # the first stage's model, state and step
    kind = trainer.tasks.first.task.spec.kind
    mask = sr.trainability.trainable_mask
    mesh = trainer.backbone.mesh
    local = [next(sr.train_iter) for _ in range(args.batches)]
    sr.train_iter.close()
    batches = [to_global_batch(b, mesh) for b in local]
    examples = sum(int(b["example_mask"].sum()) for b in local)
    n_params = sum(x.size for x in jax.tree.leaves(sr.state.params))
    n_masked = sum(x.size for x, m in zip(jax.tree.leaves(sr.state.params), jax.tree.leaves(mask)) if m)
    classes = len(trainer.tasks.label_vocab) if trainer.tasks.label_vocab is not None else None
    print(f"{args.config}: kind {kind}, {n_params / 1e6:.1f}M params ({n_masked / 1e6:.1f}M trainable), "
          f"batch {local[0]['input_ids'].shape}, classes {classes}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs")

    # the train step donates its state: the Fisher reads its own copy of the params
    params = jax.tree.map(lambda x: x.copy(), sr.state.params)
    holder = {"state": sr.state}

    def train_call(batch):
        holder["state"], metrics = sr.step_fn(holder["state"], batch)
        return metrics

    # train before and after the Fisher passes: on a shared machine the load drifts
    train_times = [timed(train_call, batches)]
    print(line("train step", examples, train_times[0]))
    key = jax.random.key(0)
    rates = {}
    for mode in args.modes:
        for chunk in args.chunks:
            try:
                step = make_fisher_step(sr.model, kind, mode, mask, mesh, sr.state_shardings.params,
                                        chunk=chunk)
            except Exception as error:  # e.g. exact over a vocabulary
                print(f"fisher {mode}: {error}")
                break
            use = batches[:args.exact_batches] if mode == "exact" else batches
            used = sum(int(b["example_mask"].sum()) for b in local[:len(use)])
            seconds = timed(lambda b: step(params, b, key), use)
            rates[(mode, chunk)] = (used / seconds[0], used / seconds[1])
            print(line(f"fisher {mode} chunk {chunk}", used, seconds))
    train_times.append(timed(train_call, batches))
    print(line("train step (again)", examples, train_times[1]))
    if args.ewc:   # the same stage with an EWC term over every trainable leaf (F = 1, anchor = start)
        def regularize(trainability, model):
            fisher = jax.tree.map(lambda p: jax.numpy.ones(p.shape, jax.numpy.float32),
                                  prune(params, trainability.trainable_mask))
            return {"ewc": ewc_term(1.0)}, {"ewc": ewc_extra(fisher, params)}

        ewc_sr = build_stage(cfg, trainer.stages[0], trainer.backbone, trainer.tasks, params,
                             trainer.param_shardings, regularize=regularize)
        ewc_sr.train_iter.close()
        ewc_holder = {"state": ewc_sr.state}

        def ewc_call(batch):
            ewc_holder["state"], metrics = ewc_sr.step_fn(ewc_holder["state"], batch)
            return metrics

        ewc_times = timed(ewc_call, batches)
        plain_times = timed(train_call, batches)
        print(line("train step with EWC", examples, ewc_times))
        print(line("train step (again)", examples, plain_times))
        print(f"EWC step-time overhead: {100 * (ewc_times[0] / plain_times[0] - 1):+.1f}% wall, "
              f"{100 * (ewc_times[1] / plain_times[1] - 1):+.1f}% CPU (target <= +5%)")
    train_wall = examples / (sum(t[0] for t in train_times) / len(train_times))
    train_cpu = examples / (sum(t[1] for t in train_times) / len(train_times))
    for (mode, chunk), (wall, cpu) in rates.items():
        target = 0.30 / classes if mode == "exact" and classes else 0.30
        print(f"fisher {mode} chunk {chunk} / train: {wall / train_wall:.2f} wall, {cpu / train_cpu:.2f} CPU "
              f"(target >= {target:.3f})")


if __name__ == "__main__":
    main()
