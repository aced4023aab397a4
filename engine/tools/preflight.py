"""`tenure launch --preflight CONFIG`: what a multi-host run needs, checked in seconds.

Every process runs the same checks; each failure is one line naming the process, the config
key and the fix. The checks:
  processes / devices   the job's process and device counts (and devices per process)
  mesh                  mesh.data x mesh.fsdp x mesh.tensor resolves to the device count
  batch                 every task's data.batch_size (and eval batch) divides by data x fsdp
                        and by the process count
  heads                 attention heads (and KV heads) divide by mesh.tensor (config.json only)
  all-reduce            a sum over every device of every process returns the expected value
  data shard            every process can open its training files and gets a non-empty shard
  checkpoint dir        every process can create and write the checkpoint directory
The processes then agree (one all-gather) on whether all of them passed, so every process
exits with the same code. No weights are loaded.
"""
from __future__ import annotations

import dataclasses
import pathlib
import socket

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from tenure.engine.runtime import distributed, sharding
from tenure.engine.config.schema import Config
from tenure.models.errors import TenureError


@dataclasses.dataclass
class Report:
    lines: list[str] = dataclasses.field(default_factory=list)     # what was checked, process 0 prints
    failures: list[str] = dataclasses.field(default_factory=list)  # one line each, this process's

    def ok(self, name: str, detail: str) -> None:
        self.lines.append(f"  ok    {name:<15} {detail}")

    def fail(self, name: str, detail: str) -> None:
        line = f"preflight: process {jax.process_index()}: {name}: {detail}"
        self.failures.append(line)
        self.lines.append(f"  FAIL  {name:<15} {detail}")


def _tasks(cfg: Config):
    from tenure.engine.config.plan import plan
    return plan(cfg).tasks


def _heads(model_path: str) -> tuple[int | None, int | None, str]:
    from tenure.models.hf import read_config, resolve_model_dir
    directory = resolve_model_dir(model_path)
    hf = read_config(directory)
    heads = hf.get("num_attention_heads") or hf.get("n_head")
    kv = hf.get("num_key_value_heads") or heads
    return heads, kv, str(directory / "config.json")


def check_all_reduce(mesh) -> tuple[bool, str]:
    """Every device holds (its process index + 1); the jitted sum over the mesh must match."""
    devices = mesh.devices.reshape(-1)
    flat = jax.sharding.Mesh(devices, ("all",))
    spec = NamedSharding(flat, P("all"))
    x = jax.make_array_from_callback(
        (len(devices),), spec,
        lambda index: np.asarray([d.process_index + 1 for d in devices[index[0]]], np.float32))
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(flat, P()))(x))
    expected = float(sum(d.process_index + 1 for d in devices))
    return total == expected, f"sum over {len(devices)} devices = {total:g} (expected {expected:g})"


def check_mesh_and_batch(cfg: Config, tasks: dict, report: Report):
    """(mesh shape, mesh), both None when the mesh does not resolve: mesh.* against the device
    count, and every task's batch sizes against data x fsdp and the process count."""
    pc, total = jax.process_count(), jax.device_count()
    mesh = None
    try:
        shape = sharding.mesh_shape(cfg.mesh, total)
        mesh = sharding.make_mesh(cfg.mesh)
        report.ok("mesh", f"data={shape[0]} fsdp={shape[1]} tensor={shape[2]} on {total} devices")
    except TenureError as exc:
        report.fail("mesh", str(exc))
        return None, None
    shards = shape[0] * shape[1]
    for name, task in tasks.items():
        where = "data" if cfg.data is not None else f"tasks.{name}.data"
        for key, size in (("batch_size", task.data.batch_size),
                          ("eval_batch_size", task.data.global_eval_batch_size)):
            if size % shards or size % pc:
                need = int(np.lcm(shards, pc))
                report.fail("batch", f"config key '{where}.{key}': {size} is not divisible by data x fsdp = "
                                     f"{shards} and {pc} processes; use a multiple of {need}")
    if tasks and not any("batch" in f for f in report.failures):
        report.ok("batch", f"batch sizes divide by data x fsdp = {shards} and {pc} processes")
    return shape, mesh


def run(cfg: Config) -> Report:
    """Runs every check on this process; returns the report (collectives: all processes take part)."""
    report = Report()
    pc, pi = jax.process_count(), jax.process_index()
    local, total = jax.local_device_count(), jax.device_count()
    report.ok("processes", f"{pc} (this is process {pi} on {socket.gethostname()}), "
                           f"{total} {jax.devices()[0].platform} devices, {local} per process")
    counts = multihost_utils.process_allgather(np.asarray([local], np.int32)).reshape(-1)
    if len(set(counts.tolist())) > 1:
        report.fail("devices", f"processes hold different device counts {counts.tolist()}; "
                               "every host must expose the same number of devices")
    try:
        tasks = _tasks(cfg)
    except TenureError as exc:
        report.fail("config", str(exc))
        tasks = {}
    shape, mesh = check_mesh_and_batch(cfg, tasks, report)
    if shape is not None:
        try:
            heads, kv, where = _heads(cfg.model.path)
            tensor = shape[2]
            if heads is None:
                report.ok("heads", f"{where} names no attention heads; not checked")
            elif heads % tensor or kv % tensor:
                report.fail("heads", f"{where}: {heads} heads / {kv} KV heads do not divide by mesh.tensor="
                                     f"{tensor}; pick mesh.tensor from the divisors of {int(np.gcd(heads, kv))}")
            else:
                report.ok("heads", f"{heads} heads, {kv} KV heads divide by mesh.tensor={tensor}")
        except TenureError as exc:
            report.fail("model", str(exc))

    if mesh is not None:
        good, detail = check_all_reduce(mesh)
        (report.ok if good else report.fail)("all-reduce", detail)

    from tenure.engine.data.sources import open_source
    for name, task in tasks.items():
        for source, spec in task.data.sources.items():
            label = f"source {source}" if cfg.data is not None else f"task {name} source {source}"
            try:
                n = len(open_source(spec.path))
            except (TenureError, OSError, ValueError) as exc:
                report.fail("data", f"{label}: {exc}")
                continue
            usable = n - n % pc
            if usable == 0:
                report.fail("data", f"{label}: {n} records cannot be split over {pc} processes")
            else:
                report.ok("data", f"{label}: {n} records, {usable // pc} in this process's shard")

    ckpt_dir = cfg.checkpoint.resolved_dir(cfg.run_dir)
    probe = pathlib.Path(ckpt_dir) / f".preflight-process-{pi}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
        report.ok("checkpoint dir", f"{ckpt_dir} is writable")
    except OSError as exc:
        report.fail("checkpoint dir", f"{ckpt_dir}: cannot write ({exc.strerror or exc}); set checkpoint.dir to a "
                                      "directory every host can write (a shared filesystem or a bucket mount)")
    return report


def preflight(cfg: Config, *, verbose: bool = True) -> bool:
    """Runs the checks on every process; prints the report on process 0 and every failure on the
    process that saw it. True when every process passed (the same answer on every process)."""
    distributed.initialize()
    report = run(cfg)
    failed = multihost_utils.process_allgather(np.asarray([len(report.failures)], np.int32)).reshape(-1)
    if verbose and distributed.is_primary():
        print(f"preflight ({jax.process_count()} processes, {jax.device_count()} devices):\n"
              + "\n".join(report.lines), flush=True)
    for line in report.failures:
        print(line, flush=True)
    bad = [i for i, n in enumerate(failed.tolist()) if n]
    if verbose and distributed.is_primary():
        print("preflight: all checks passed on every process" if not bad else
              f"preflight: failed on process{'es' if len(bad) > 1 else ''} {', '.join(map(str, bad))}", flush=True)
    return not bad


def require(cfg: Config) -> None:
    """The first thing of every `tenure train`: the mesh and batch checks of the config's planned
    tasks (one line naming the key), and with several processes the whole preflight (raises one
    line if any process failed)."""
    if jax.process_count() > 1:
        if not preflight(cfg, verbose=False):
            raise TenureError("preflight failed (the lines above name each problem); "
                              "`tenure launch --preflight CONFIG` prints the full report")
        return
    report = Report()
    check_mesh_and_batch(cfg, _tasks(cfg), report)
    if report.failures:
        raise TenureError(report.failures[0].split(": ", 3)[3])


def _cmd_launch(args) -> int:
    from tenure.engine.config.schema import load_config
    if not args.preflight:
        raise TenureError("tenure launch: only --preflight is implemented (start processes with tpu/launch.sh "
                          "or scripts/slurm/tenure.sbatch)")
    return 0 if preflight(load_config(args.config, args.overrides)) else 1


def add_parser(sub, with_config) -> None:
    p = with_config(sub.add_parser("launch", help="check a (multi-host) launch before paying for it"))
    p.add_argument("--preflight", action="store_true",
                   help="device/process counts, mesh, batch and head divisibility, an all-reduce, data "
                        "shards and the checkpoint dir, on every process")
    p.set_defaults(fn=_cmd_launch)
