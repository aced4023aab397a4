"""`tenure compile CONFIG --topology v5p-8`: the real train step compiled ahead of time for a
machine this host does not have, with abstract parameters (no weights are read).

The step is `tenure train`'s, assembled by the same functions (tenure.engine.train.assemble.abstract_step,
on tenure.engine.train.build); the model comes from the config's `config.json` alone; parameters, optimizer
state and the batch are `jax.ShapeDtypeStruct`s carrying the shardings the run would use, so `jax.jit(train_step).lower(...).compile()` runs XLA's full SPMD partitioner and the
target backend's compiler. TPU topologies come from libtpu (`pip install tenure[tpu]`) through
`jax.experimental.topologies.get_topology_desc`; `cpu:N` compiles for N simulated CPU devices.

The report: per-chip memory from the executable's own `memory_analysis()` (arguments,
outputs, temporaries, generated code; with the donated state the outputs alias the
arguments), FLOPs per step from `cost_analysis()` (per chip: the partitioned program), the
largest arrays and their shardings, and the step time projected at a stated MFU (model FLOPs
utilisation: FLOPs / (peak FLOP/s x MFU)). When the total exceeds the chip's HBM, `tenure
compile` exits 1 with one line naming what to change.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp

from tenure.engine.runtime import sharding
from tenure.engine.train.assemble import abstract_step
from tenure.engine.config.schema import Config
from tenure.engine.tools.argtypes import number
from tenure.models.errors import TenureError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int          # per chip
    peak_flops: float       # dense bf16 FLOP/s per chip
    cores_per_chip: int     # the "-N" of a slice name counts TensorCores on v4/v5p, chips on v5e/v6e


# Public spec-sheet figures per chip.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 2),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 1),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1),
}
ALIASES = {"v5litepod": "v5e", "v6": "v6e", "v5": "v5p"}
# chips -> the physical shape libtpu expects ("v5p:2x2x1"); 3-D tori for v4/v5p, 2-D for v5e/v6e
SHAPES_3D = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
             128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass
class Target:
    name: str              # as the user wrote it
    devices: list
    chip: Chip | None      # None: a CPU target (no HBM limit, no peak)


def parse_topology(name: str) -> tuple[str, str, int]:
    """("tpu", "v5p:2x2x1", chips) or ("cpu", "", n) for names like v5p-8, v6e-16, v5p:2x2x2, cpu:4."""
    if m := re.fullmatch(r"cpu:(\d+)", name):
        if int(m.group(1)) < 1:
            raise TenureError(f"--topology {name}: give at least one device (cpu:1)")
        return "cpu", "", int(m.group(1))
    if m := re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name):
        gen = ALIASES.get(m.group(1), m.group(1))
        if gen not in CHIPS:
            raise TenureError(f"--topology {name}: unknown TPU generation {m.group(1)!r}; known: {', '.join(CHIPS)}")
        chips = int(m.group(2)) // CHIPS[gen].cores_per_chip
        shapes = SHAPES_3D if gen in ("v4", "v5p") else SHAPES_2D
        if chips not in shapes:
            raise TenureError(f"--topology {name}: {chips} chips has no slice shape here; "
                              f"give it as {gen}:AxBxC")
        return "tpu", f"{gen}:{shapes[chips]}", chips
    if m := re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name):
        gen = ALIASES.get(m.group(1), m.group(1))
        if gen not in CHIPS:
            raise TenureError(f"--topology {name}: unknown TPU generation {m.group(1)!r}; known: {', '.join(CHIPS)}")
        return "tpu", f"{gen}:{m.group(2)}", math.prod(int(x) for x in m.group(2).split("x"))
    raise TenureError(f"--topology {name}: expected a slice like v5p-8, v6e-16, a shape like v5p:2x2x2, or cpu:N")


def _accelerator_type(desc: str) -> str:
    gen, dims = desc.split(":")
    chips = math.prod(int(x) for x in dims.split("x"))
    return f"{'v5litepod' if gen == 'v5e' else gen}-{chips * CHIPS[gen].cores_per_chip}"


def target_devices(name: str) -> Target:
    kind, desc, count = parse_topology(name)
    if kind == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise TenureError(f"--topology {name}: this process has {len(devices)} CPU devices; "
                              f"set JAX_NUM_CPU_DEVICES={count}")
        return Target(name, devices[:count], None)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TenureError(f"--topology {name}: compiling for TPU needs libtpu (pip install 'tenure[tpu]')") from None
    # A topology description only: no chip is opened, and this host is not a TPU VM, so libtpu is
    # told not to look for one (metadata server, worker hostnames) and not to take its lock file.
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("TPU_ACCELERATOR_TYPE", _accelerator_type(desc))):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(desc, "tpu")
    return Target(name, list(topology.devices), CHIPS[desc.split(":")[0]])


@dataclasses.dataclass
class Compiled:
    target: Target
    mesh_shape: dict
    compiled: object
    memory: dict            # bytes per chip
    flops: float            # per chip per step
    largest: list           # (path, shape, dtype, spec, bytes per chip)
    params: int
    trainable: int
    tokens_per_step: int


def _per_chip_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(math.prod(shape)) * jnp.dtype(x.dtype).itemsize


def build_abstract_step(cfg: Config, target: Target, *, num_labels: int = 2):
    """(jitted train step, abstract state, abstract batch, mesh, trainability) of the config's
    first stage on `target`, with no weights anywhere: `tenure train`'s step, assembled by the
    same functions (tenure.engine.train.assemble.abstract_step)."""
    built = abstract_step(cfg, target.devices, num_labels=num_labels)
    return built.step.step_fn, built.step.state, built.batch, built.mesh, built.step.trainability


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    memory = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
              "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
              "code": int(mem.generated_code_size_in_bytes)}
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                       + memory["code"])
    return memory


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def compile_fisher(cfg: Config, topology: str, *, num_labels: int = 2, chunk: int = 8):
    """(memory, flops) per chip of the EWC Fisher step (`tenure.engine.continual.fisher.make_fisher_step`, the config's
    ewc.fisher mode) of the first stage's model over one training batch, on the same abstract params."""
    from tenure.engine.continual.fisher import make_fisher_step
    built = abstract_step(cfg, target_devices(topology).devices, num_labels=num_labels)
    step, mesh = built.step, built.mesh
    spec = built.tasks.by_name[next(iter(step.stage.weights))].task.spec
    param_shardings = jax.tree.map(lambda x: x.sharding, step.state.params)
    fisher = make_fisher_step(step.model, spec.kind, step.stage.ewc.fisher, step.trainability.trainable_mask, mesh,
                              param_shardings, temperature=spec.temperature, chunk=chunk)
    repl = sharding.replicated(mesh)
    compiled = fisher.jitted.lower(step.state.params, built.batch, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl),
                                   jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)).compile()
    return _memory(compiled), _flops(compiled)


def compile_for(cfg: Config, topology: str, *, num_labels: int = 2) -> Compiled:
    target = target_devices(topology)
    step_fn, state, batch, mesh, trainability = build_abstract_step(cfg, target, num_labels=num_labels)
    lowered = step_fn.lower(state, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as exc:  # the TPU compiler refuses a program that cannot fit
        text = str(exc)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        m = re.search(r"required for HLO temporaries \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)", text)
        need = f"{m.group(1)} of temporaries > {m.group(2)} HBM free per chip" if m else text.splitlines()[0][:160]
        raise DoesNotFit(f"does not fit: the compiler needs {need} ({target.chip.name if target.chip else 'CPU'} "
                         f"on {target.name}, mesh {dict(mesh.shape)}); try {_advice(dict(mesh.shape), cfg)}") from None
    memory = _memory(compiled)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    largest = sorted(((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(x.shape), jnp.dtype(x.dtype).name,
                       x.sharding.spec, _per_chip_bytes(x)) for path, x in leaves if x.ndim),
                     key=lambda row: -int(math.prod(row[1])) * jnp.dtype(row[2]).itemsize)
    params = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(state.params))
    task = batch["input_ids"]
    return Compiled(target, dict(mesh.shape), compiled, memory, _flops(compiled), largest[:6],
                    params, int(trainability.trainable_count),
                    int(task.shape[0] * task.shape[1]))


def _gib(n: int) -> str:
    """Bytes in the largest unit that keeps them >= 1 (GiB at most)."""
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class DoesNotFit(TenureError):
    """The step needs more memory per chip than the target has."""


def _advice(mesh: dict, cfg: Config) -> str:
    """What to change when the step does not fit: grow fsdp first, then remat, then the batch."""
    if mesh["data"] > 1:
        return (f"mesh.fsdp={mesh['fsdp'] * mesh['data']} mesh.data=1 (shard params and optimizer state over "
                "every chip)")
    if cfg.model.remat == "none":
        return "model.remat=full (recompute activations in the backward pass)"
    return ("a smaller data.batch_size with optim.grad_accum_steps (same global batch), trainable.mode=lora, "
            "or a larger slice")


def advice(c: Compiled, cfg: Config) -> str:
    return _advice(c.mesh_shape, cfg)


def report(c: Compiled, cfg: Config, mfu: float) -> tuple[str, bool]:
    """The printed report and whether the step fits the chip's HBM."""
    chip = c.target.chip
    m = c.memory
    lines = [f"tenure compile: {cfg.model.path} on {c.target.name} "
             f"({len(c.target.devices)} {'chips' if chip else 'CPU devices'}{', ' + chip.name if chip else ''}), "
             f"mesh {c.mesh_shape}",
             f"  params {c.params / 1e9:.3f} B ({c.trainable / 1e9:.3f} B trainable); tokens per step {c.tokens_per_step}",
             "  memory per chip (executable's memory_analysis):",
             f"    arguments    {_gib(m['arguments'])}",
             f"    outputs      {_gib(m['outputs'])}  ({_gib(m['aliased'])} aliased with the donated state)",
             f"    temporaries  {_gib(m['temporaries'])}",
             f"    code         {_gib(m['code'])}",
             f"    total        {_gib(m['total'])}" + (f" of {_gib(chip.hbm_bytes)} HBM "
                                                      f"({100 * m['total'] / chip.hbm_bytes:.0f}%)" if chip else ""),
             f"  FLOPs per step per chip {c.flops:.3e} (cost_analysis)"]
    if chip:
        seconds = c.flops / (chip.peak_flops * mfu)
        tokens = c.tokens_per_step / seconds if seconds else 0.0
        lines.append(f"  projected step time {seconds * 1e3:.1f} ms at {mfu:.0%} MFU of {chip.peak_flops / 1e12:.0f} "
                     f"TFLOP/s bf16 peak ({tokens:,.0f} tokens/s)")
    lines.append("  largest arrays (global shape, dtype, sharding, bytes per chip):")
    for path, shape, dtype, spec, nbytes in c.largest:
        path = re.sub(r"^opt_state/.*?/(mu|nu)/", r"adam.\1/", path)
        lines.append(f"    {path:<58} {str(shape):<16} {dtype:<8} {str(spec):<28} {_gib(nbytes)}")
    fits = chip is None or m["total"] <= chip.hbm_bytes
    return "\n".join(lines), fits


def _cmd_compile(args) -> int:
    import sys
    from tenure.engine.config.schema import load_config
    cfg = load_config(args.config, args.overrides)
    try:
        c = compile_for(cfg, args.topology, num_labels=args.num_labels)
        if args.hbm_gib is not None and c.target.chip is not None:
            c.target.chip = dataclasses.replace(c.target.chip, hbm_bytes=int(args.hbm_gib * GiB))
    except DoesNotFit as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text, fits = report(c, cfg, args.mfu)
    print(text, flush=True)
    if args.fisher:
        memory, flops = compile_fisher(cfg, args.topology, num_labels=args.num_labels)
        chip = c.target.chip
        print(f"  EWC Fisher step ({cfg.ewc.fisher}, one batch of per-example gradients): {_gib(memory['total'])} per "
              f"chip (temporaries {_gib(memory['temporaries'])}), {flops:.3e} FLOPs per chip"
              + (f"; {flops / (chip.peak_flops * args.mfu) * 1e3:.1f} ms at {args.mfu:.0%} MFU" if chip else ""),
              flush=True)
        fits = fits and (chip is None or memory["total"] <= chip.hbm_bytes)
    if not fits:
        chip = c.target.chip
        print(f"error: does not fit: {_gib(c.memory['total'])} per chip > {_gib(chip.hbm_bytes)} HBM of "
              f"{chip.name} on {c.target.name}; try {advice(c, cfg)}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub, with_config) -> None:
    p = with_config(sub.add_parser("compile", help="compile the train step ahead of time for a TPU slice "
                                                   "(or cpu:N) and report memory, FLOPs and step time"))
    p.add_argument("--topology", required=True, help="v5p-8, v5p-64, v6e-16, v5p:2x2x2, ... or cpu:N")
    p.add_argument("--mfu", type=number(float, 0, 1, low_open=True), default=0.4, help="model FLOPs utilisation the step time assumes")
    p.add_argument("--hbm-gib", type=number(float, 0, low_open=True), default=None,
                   help="plan against this much memory per chip instead of the chip's HBM (headroom)")
    p.add_argument("--fisher", action="store_true", help="also compile the EWC Fisher step (ewc.fisher mode)")
    p.add_argument("--num-labels", type=number(int, 1), default=2, help="classification heads: number of labels (of a task without data.labels)")
    p.set_defaults(fn=_cmd_compile)
