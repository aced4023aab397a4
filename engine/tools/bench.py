"""`tenure bench CONFIG [key=value ...] [--compare torch]`: train-step throughput at fixed shapes.

A bench config is a run config plus a `bench:` section (engine/tools/bench_setup.BenchConfig):
batch size, length, synthetic or real data, warm-up, timed steps per block, blocks per side.
It prints one table and one JSON line (prefixed `BENCH `) with: compile time apart (this run,
and again from the persistent compilation cache), step time p50 and its spread p5 - p95,
tokens/s (real and padded) and examples/s, model FLOPs per step (formula,
engine/tools/bench_setup.model_flops) beside the compiled step's own XLA cost_analysis, MFU against
the measured matmul peak of this host (fp32 or bf16, whichever the config computes in), peak
host memory plus XLA's plan, and the host's load average at start and end (a warning on stderr
when it is above half the cores: the figures are then not a quiet machine's).

Sides (tenure, each --ab variant, PyTorch) alternate in blocks of consecutive steps, the first
step of each block untimed (`run_blocks`), so each side runs as it would in a user's loop.
`--compare torch` runs the same model, shapes, optimizer and dropout as an HF transformers
PyTorch loop (scripts/bench_torch.py in .torch-venv, `make torch-env`) in a subprocess and
prints the ratio of the median step times (> 1 means tenure is faster). `--alone-check` then
runs each side alone, one after the other, in fresh processes, and prints those medians beside
the alternating ones.

The CLI entry points are `add_bench_parser(subparsers)` and `run_bench(args) -> int`.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tenure.models.errors import TenureError

ROOT = Path(__file__).resolve().parents[2]


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time the train step at fixed shapes (optionally vs HF PyTorch)")
    p.add_argument("config", help="bench YAML (a run config with a `bench:` section), e.g. configs/bench/minilm.yaml")
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value",
                   help="overrides, e.g. model.dtype=bfloat16 bench.steps=10 trainable.mode=head")
    p.add_argument("--compare", choices=["torch"], default=None,
                   help="also time the HF transformers PyTorch loop, alternating blocks of steps")
    p.add_argument("--alone-check", action="store_true",
                   help="with --compare torch: also time each side alone, one after the other, in fresh "
                        "processes, and print those figures beside the alternating ones")
    p.add_argument("--ab", nargs="+", action="append", default=None, metavar="key=value",
                   help="also time a tenure variant with these overrides, alternating blocks; repeat "
                        "for more variants (e.g. --ab model.dtype=bfloat16 --ab trainable.mode=head)")
    p.add_argument("--max-load", type=float, default=None, metavar="LOAD",
                   help="warn when the host's 1-minute load average exceeds this (default: half the cores)")
    p.add_argument("--cache-dir", default=None,
                   help="persistent compilation cache (default $TENURE_COMPILATION_CACHE or ~/.cache/tenure/xla)")
    p.add_argument("--cold", action="store_true", help="compile into a fresh empty cache (a cold compile)")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the host matmul peak (no MFU)")
    p.set_defaults(fn=run_bench)


def load_bench_config(path: str, overrides: list[str]):
    """(Config, BenchConfig) from a bench YAML and key=value overrides (bench.* go to the bench section)."""
    from tenure.engine.tools.bench_setup import BenchConfig
    import pydantic
    from tenure.engine.config.schema import _describe, _parse_override, _set_path, one_line, read_yaml_mapping, validate
    file = Path(path)
    tree = read_yaml_mapping(file, "config file", "sections")
    for text in overrides:
        keys, value = _parse_override(text)
        _set_path(tree, keys, value, f"override {text!r}")
    section = tree.pop("bench", {}) or {}
    tree.setdefault("data", {})
    try:
        bench = BenchConfig.model_validate(section)
    except pydantic.ValidationError as exc:
        raise one_line(exc, str(file), lambda error: _describe({**error, "loc": ("bench", *error["loc"])})) from None
    return validate(tree, str(file)), bench


def percentile(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times), q))


def run_blocks(sides: list[tuple[str, object]], steps: int, rounds: int) -> list[dict]:
    """Each round runs one block per side in order (A, B, torch, A, B, torch, ...); a block is
    `steps` + 1 consecutive steps of that side. Returns the blocks in run order:
    {"side", "round", "spans": [[start, end], ...]} on the host's monotonic clock."""
    return [{"side": label, "round": r, "spans": runner.run(steps + 1)}
            for r in range(rounds) for label, runner in sides]


def block_times(blocks: list[dict], side: str) -> tuple[list[float], list[float]]:
    """(timed step durations, first-step durations) of one side: the first step of each block is
    dropped from the timing (it pays for the switch from the other side)."""
    timed, firsts = [], []
    for block in blocks:
        if block["side"] == side:
            durations = [end - start for start, end in block["spans"]]
            firsts.append(durations[0])
            timed += durations[1:]
    return timed, firsts


def load_warning(load: tuple[float, ...], when: str, limit: float) -> str | None:
    """The stderr warning when the 1-minute load average is above `limit`, else None."""
    if load[0] <= limit:
        return None
    return (f"warning: the host's 1-minute load average is {load[0]:.2f} at {when} (above {limit:g}, "
            f"for {os.cpu_count()} cores): other processes share the cores, so these figures are not a "
            "quiet machine's; PyTorch's threads lose 3-4x to any other busy process")


class TenureRunner:
    """Compiles the step (timed), then runs timed steps on the cycled batches."""

    def __init__(self, b, cache_dir: str):
        import jax
        from tenure.engine.runtime.xla_env import cache_entries
        self.b, self.jax = b, jax
        self.device_batches = b.device_batches()
        before = cache_entries(cache_dir)
        start = time.perf_counter()
        lowered = b.step_fn.lower(b.state, self.device_batches[0])
        self.lower_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        cacheable = not b.onednn
        self.cache_hit = cacheable and cache_entries(cache_dir) == before
        self.compile_cached_s = None
        if cacheable:  # the executable is in the persistent cache now
            jax.clear_caches()  # compile again from a fresh trace: now served by the cache
            relowered = b.step_fn.lower(b.state, self.device_batches[0])
            start = time.perf_counter()
            relowered.compile()
            self.compile_cached_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        self.memory = self.compiled.memory_analysis()
        self.state, self.count, self.loss = b.state, 0, None

    def run(self, steps: int) -> list[list[float]]:
        """[start, end] of each step on time.monotonic (CLOCK_MONOTONIC: one clock for all processes)."""
        spans = []
        for _ in range(steps):
            batch = self.device_batches[self.count % len(self.device_batches)]
            self.count += 1
            start = time.monotonic()
            self.state, metrics = self.compiled(self.state, batch)
            self.loss = float(self.jax.block_until_ready(metrics["loss"]))
            spans.append([start, time.monotonic()])
        return spans


def torch_spec(b, tmp: str) -> Path:
    """Writes the PyTorch loop's spec (and the batches it reads) for scripts/bench_torch.py."""
    from tenure.engine.train.optim import warmup_steps
    cfg = b.cfg
    if cfg.trainable.mode not in ("full", "lora") or cfg.trainable.llrd is not None:
        raise TenureError("--compare torch times full fine-tuning and LoRA (PEFT) only (trainable.mode=full "
                          "or lora, no llrd)")
    if cfg.optim.name != "adamw" or cfg.optim.grad_accum_steps != 1 or cfg.model.remat != "none":
        raise TenureError("--compare torch needs optim.name=adamw, grad_accum_steps=1, model.remat=none")
    npz = Path(tmp) / "batches.npz"
    np.savez(npz, **{f"batch_{i}_{k}": v for i, batch in enumerate(b.batches) for k, v in batch.items()})
    total = b.bench.total_steps
    spec = {"model_dir": str(b.model_dir), "init": cfg.model.init, "kind": cfg.task.kind,
            "num_labels": b.num_labels, "batches": str(npz), "dtype": cfg.model.dtype,
            "dropout": cfg.model.dropout, "lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
            "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay, "clip_norm": cfg.optim.clip_norm,
            "total_steps": total, "warmup_steps": warmup_steps(cfg.optim, total),
            "warmup": b.bench.warmup, "seed": cfg.train.seed,
            "lora": ({"rank": cfg.trainable.lora.rank, "alpha": cfg.trainable.lora.alpha,
                      "targets": list(cfg.trainable.lora.targets), "dropout": cfg.trainable.lora.dropout}
                     if cfg.trainable.mode == "lora" else None)}
    path = Path(tmp) / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def torch_python_or_error() -> Path:
    from tenure.models.parity import torch_python
    python = torch_python()
    if python is None:
        raise TenureError("--compare torch needs the PyTorch environment: run `make torch-env`")
    return python


class TorchRunner:
    """scripts/bench_torch.py in the torch environment (a fresh process), driven over stdin/stdout."""

    def __init__(self, spec: Path):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
        self.proc = subprocess.Popen([str(torch_python_or_error()), str(ROOT / "scripts" / "bench_torch.py"), str(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()
        self.loss, self.peak_rss_mb = self.ready.get("loss"), None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise TenureError(f"the PyTorch loop (scripts/bench_torch.py) exited with code {self.proc.returncode}")
        return json.loads(line)

    def run(self, steps: int) -> list[list[float]]:
        """[start, end] of each step, on the same monotonic clock as TenureRunner.run."""
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.loss, self.peak_rss_mb = reply["loss"], reply["peak_rss_mb"]
        return reply["spans"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


SPREAD = ("step_p50_s", "step_p5_s", "step_p95_s", "first_of_block_p50_s")


def _spread(times: list[float], firsts: list[float]) -> dict[str, float]:
    """Median and p5 / p95 of the timed steps, and the median of the dropped first steps."""
    return dict(zip(SPREAD, (percentile(times, 50), percentile(times, 5), percentile(times, 95),
                             percentile(firsts, 50))))


def _rates(times: list[float], firsts: list[float], rows: int, padded: float, real: float) -> dict[str, float]:
    spread = _spread(times, firsts)
    p50 = spread["step_p50_s"]
    return {**spread, "tokens_per_s_padded": padded / p50, "tokens_per_s_real": real / p50, "examples_per_s": rows / p50}


def _fmt(value, digits=3) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _record(args, cfg, bench, b, runner, times, firsts, build_s, peak, overrides) -> dict:
    from tenure.engine.tools.bench_setup import model_flops
    from tenure.engine.runtime import host_memory
    from tenure.engine.runtime.xla_env import host_description
    rows, length = bench.batch_size, bench.length
    padded = float(rows * length)
    real = float(np.mean([x["attention_mask"].sum() for x in b.batches]))
    flops = model_flops(b.arch, b.state.params, b.trainability, cfg.task.kind, rows, length)
    record = {"config": args.config, "overrides": overrides, "host": host_description(),
              "task": cfg.task.kind, "dtype": cfg.model.dtype, "trainable": cfg.trainable.mode,
              "batch_size": rows, "length": length, "data": bench.data, "steps_timed": len(times),
              "rounds": bench.rounds, "block_steps": bench.steps,
              "onednn": b.onednn, "host_malloc": host_memory.MODE,
              "build_s": build_s, "compile_s": runner.compile_s, "compile_was_cache_hit": runner.cache_hit,
              "compile_cached_s": runner.compile_cached_s, "lower_s": runner.lower_s,
              **_rates(times, firsts, rows, padded, real),
              "model_flops_per_step": flops["total"],
              "model_flops_terms": {k: v for k, v in flops.items() if k != "total"},
              "xla_flops_per_step": runner.xla_flops, "final_loss": runner.loss,
              "peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "xla_temp_mb": getattr(runner.memory, "temp_size_in_bytes", 0) / 2**20,
              "xla_argument_mb": getattr(runner.memory, "argument_size_in_bytes", 0) / 2**20,
              "trainable_params": b.trainability.trainable_count,
              "params_mb": _tree_mb(runner.state.params), "optimizer_state_mb": _tree_mb(runner.state.opt_state)}
    if peak:
        record["host_matmul_peak_flops"] = peak
        record["mfu"] = flops["total"] / record["step_p50_s"] / peak
    return record


def run_bench(args) -> int:
    cfg, bench = load_bench_config(args.config, args.overrides)
    if args.alone_check and args.compare != "torch":
        raise TenureError("--alone-check compares against PyTorch alone: it needs --compare torch")
    if args.compare == "torch":
        torch_python_or_error()  # before minutes of building and compiling
    max_load = args.max_load if args.max_load is not None else (os.cpu_count() or 1) / 2
    load_start = os.getloadavg()
    _warn(load_warning(load_start, "start", max_load))
    variants = [(f"B{i + 1}" if len(args.ab) > 1 else "B", [*args.overrides, *ab])
                for i, ab in enumerate(args.ab or [])]
    from tenure.engine.tools.bench_setup import build_bench, check_length
    configs = [("A", (cfg, bench), args.overrides)] + [
        (label, load_bench_config(args.config, overrides), overrides) for label, overrides in variants]
    _check_shared_schedule(configs, bench)
    for warning in dict.fromkeys(check_length(c, bc, Path(args.config)) for _, (c, bc), _ in configs):
        _warn(warning)  # each once: variants usually share the model and length
    from tenure.engine.runtime.xla_env import enable_compilation_cache, matmul_peak
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = enable_compilation_cache(Path(tmp) / "xla" if args.cold else args.cache_dir)
        import jax.numpy as jnp
        peaks = {} if args.no_peak else {dt: matmul_peak(jnp.dtype(dt)) for dt in {c.model.dtype for _, (c, _), _ in configs}}
        runs = []  # (label, cfg, bench, built, runner, build_s, overrides)
        for label, (c, bc), overrides in configs:
            start = time.perf_counter()
            built = build_bench(c, bc, Path(args.config))
            build_s = time.perf_counter() - start
            runs.append((label, c, bc, built, TenureRunner(built, cache_dir), build_s, overrides))
        spec = torch_spec(runs[0][3], tmp) if args.compare == "torch" else None
        torch = TorchRunner(spec) if spec is not None else None
        sides = [(label, runner) for label, _, _, _, runner, _, _ in runs] + ([("torch", torch)] if torch else [])
        try:
            for _, _, bc, _, runner, _, _ in runs:
                runner.run(bc.warmup)
            blocks = run_blocks(sides, bench.steps, bench.rounds)
        finally:
            if torch is not None:
                torch.close()
        alone = _alone_check(args, bench, spec, cache_dir) if args.alone_check else None
    load_end = os.getloadavg()
    _warn(load_warning(load_end, "end", max_load))
    records = [dict(_record(args, c, bc, built, runner, *block_times(blocks, label), build_s,
                            peaks.get(c.model.dtype), overrides), variant=label)
               for label, c, bc, built, runner, build_s, overrides in runs]
    record = records[0]
    record["schedule"] = blocks
    if torch is not None:
        rows, length = bench.batch_size, bench.length
        real = float(np.mean([x["attention_mask"].sum() for x in runs[0][3].batches]))
        record["torch"] = {**_rates(*block_times(blocks, "torch"), rows, float(rows * length), real),
                           "final_loss": torch.loss, "peak_rss_mb": torch.peak_rss_mb,
                           "version": torch.ready.get("torch"), "threads": torch.ready.get("threads")}
        for r in records:
            r["speed_ratio_vs_torch"] = record["torch"]["step_p50_s"] / r["step_p50_s"]
    if alone is not None:
        for side, alternating in (("tenure", record), ("torch", record["torch"])):
            alone[side]["difference"] = alternating["step_p50_s"] / alone[side]["step_p50_s"] - 1
        alone["speed_ratio_vs_torch"] = alone["torch"]["step_p50_s"] / alone["tenure"]["step_p50_s"]
        record["alone_check"] = alone
    for other in records[1:]:
        other["speed_ratio_vs_A"] = record["step_p50_s"] / other["step_p50_s"]
    for r in records:
        r["load_average_start"], r["load_average_end"] = list(load_start), list(load_end)
        print(_table(r))
        print()
    for r in records[1:]:
        extra = r["overrides"][len(args.overrides):]
        print(f"{r['variant']} ({' '.join(extra)}) vs A: {r['speed_ratio_vs_A']:.2f}x step rate "
              "(ratio of median step times, alternated blocks)")
    for r in records:
        print("BENCH " + json.dumps(r, default=float))
    return 0


def _warn(message: str | None) -> None:
    if message:
        print(message, file=sys.stderr, flush=True)


def _check_shared_schedule(configs, bench) -> None:
    for label, (_, bc), _ in configs[1:]:
        if (bc.steps, bc.rounds) != (bench.steps, bench.rounds):
            raise TenureError(f"--ab variant {label}: bench.steps and bench.rounds set the schedule all sides share; "
                              "give them before --ab")


def _alone_check(args, bench, spec: Path, cache_dir) -> dict:
    """Each side alone in a fresh process, one after the other, with the same warm-up and blocks:
    tenure through `tenure bench` without --compare, then the PyTorch loop. {side: its spread}."""
    command = [sys.executable, "-m", "tenure.engine.cli", "bench", args.config, *args.overrides, "--no-peak",
               "--max-load", "inf", "--cache-dir", str(cache_dir)]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TenureError(f"--alone-check: tenure alone (`{' '.join(command[2:])}`) failed: {tail}")
    tenure = json.loads(lines[0][len("BENCH "):])
    torch = TorchRunner(spec)
    try:
        torch_times = block_times(run_blocks([("torch", torch)], bench.steps, bench.rounds), "torch")
    finally:
        torch.close()
    return {"tenure": {k: tenure[k] for k in SPREAD}, "torch": _spread(*torch_times)}


def _tree_mb(tree) -> float:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")) / 2**20


ALONE_LIMIT = 0.05  # issue 27: alternating and alone PyTorch medians agree within 5% on a quiet machine


def _cells(side: dict) -> list[tuple[str, str]]:
    return [("step p50 (s)", f"{side['step_p50_s']:.3f}"),
            ("step p5 - p95 (s)", f"{side['step_p5_s']:.3f} - {side['step_p95_s']:.3f}"),
            ("first of block p50 (s)", f"{side['first_of_block_p50_s']:.3f}"),
            ("tokens/s padded", _fmt(side["tokens_per_s_padded"])),
            ("tokens/s real", _fmt(side["tokens_per_s_real"])),
            ("examples/s", _fmt(side["examples_per_s"])),
            ("final loss", _fmt(side["final_loss"], 5))]


def _table(r: dict) -> str:
    torch = r.get("torch")
    columns = [_cells(r)] + ([_cells(torch)] if torch else [])
    start, end = (" / ".join(f"{x:.2f}" for x in r[k]) for k in ("load_average_start", "load_average_end"))
    lines = [f"[{r.get('variant', 'A')}] tenure bench {r['config']} {' '.join(r['overrides'])}".rstrip(),
             f"host: {r['host']}",
             f"load average (1 / 5 / 15 min): start {start}, end {end} ({os.cpu_count()} cores)",
             f"{r['task']} {r['batch_size']}x{r['length']} ({r['data']}), {r['dtype']}, trainable={r['trainable']} "
             f"onednn={r['onednn']} host_malloc={r['host_malloc']} ({r['trainable_params']:,} params)",
             f"{r['steps_timed']} timed steps: {r['rounds']} blocks of 1 + {r['block_steps']} steps per side, "
             "alternated, the first step of each block dropped",
             f"{'':26}{'tenure':>18}" + (f"{'HF PyTorch':>18}" if torch else "")]
    for i, (name, _) in enumerate(columns[0]):
        lines.append(f"{name:26}" + "".join(f"{column[i][1]:>18}" for column in columns))
    if torch:
        lines.append(f"speed ratio (torch p50 / tenure p50): {r['speed_ratio_vs_torch']:.2f}x")
    alone = r.get("alone_check")
    if alone:
        lines += [f"{'alone, fresh process p50':26}{alone['tenure']['step_p50_s']:>18.3f}"
                  f"{alone['torch']['step_p50_s']:>18.3f}",
                  f"{'alternating / alone - 1':26}{alone['tenure']['difference']:>+18.1%}"
                  f"{alone['torch']['difference']:>+18.1%}",
                  f"speed ratio alone: {alone['speed_ratio_vs_torch']:.2f}x; PyTorch alternating vs alone "
                  + ("within" if abs(alone["torch"]["difference"]) <= ALONE_LIMIT else "NOT within")
                  + f" {ALONE_LIMIT:.0%} (the limit on a quiet machine)"]
    hit = " (cache hit)" if r["compile_was_cache_hit"] else ""
    cached = (f"from the persistent cache {r['compile_cached_s']:.1f} s" if r["compile_cached_s"] is not None
              else "not cacheable (oneDNN executables do not serialise in this jaxlib)")
    lines += [f"compile: {r['compile_s']:.1f} s{hit}, {cached} "
              f"(trace+lower {r['lower_s']:.1f} s, build {r['build_s']:.1f} s)",
              f"model FLOPs/step {r['model_flops_per_step']:.3e} (6N·T + attention; XLA cost_analysis "
              f"{r['xla_flops_per_step']:.3e})"]
    if "mfu" in r:
        lines.append(f"MFU {100 * r['mfu']:.1f}% of this host's measured {r['dtype']} matmul peak "
                     f"{r['host_matmul_peak_flops'] / 1e9:.0f} GFLOP/s")
    lines.append(f"memory: peak host RSS {r['peak_host_rss_mb']:.0f} MB; XLA plan: arguments "
                 f"{r['xla_argument_mb']:.0f} MB + temporaries {r['xla_temp_mb']:.0f} MB; params "
                 f"{r['params_mb']:.1f} MB, optimizer state {r['optimizer_state_mb']:.1f} MB"
                 + (f"; torch peak RSS {torch['peak_rss_mb']:.0f} MB" if torch else ""))
    return "\n".join(lines)
