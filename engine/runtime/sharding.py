"""Device mesh, logical-axis rules, and sharded params.

Every param carries logical axis names (`nn.with_logical_partitioning`); `LOGICAL_RULES`
maps them to the mesh axes ("data", "fsdp", "tensor"). A dim that the mapped mesh axes do
not divide stays replicated, so tiny test models and odd vocab sizes run on any mesh.
Batches are sharded over ("data", "fsdp") on their leading dim.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from pydantic import BaseModel, ConfigDict, Field

from tenure.models.errors import TenureError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("norm", None),
    ("position", None),
    ("lora_rank", None),
    ("layers", None),
)


class MeshConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: int = Field(-1, description="data-parallel size; -1 = all devices left after the others")
    fsdp: int = Field(1, description="fully-sharded data-parallel size (params sharded on 'embed'); -1 = fill")
    tensor: int = Field(1, description="tensor-parallel size (mlp/heads/vocab dims); -1 = fill")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 entries and checks the product equals the device count."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise TenureError(f"config key 'mesh.{name}': must be a positive size or -1 (got {size})")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise TenureError(f"config keys {', '.join('mesh.' + n for n in fill)}: at most one may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % fixed:
        keys = ", ".join(f"mesh.{n}={s}" for n, s in sizes.items())
        raise TenureError(f"config keys {keys}: product {fixed} does not divide the {num_devices} devices")
    if fill:
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        keys = ", ".join(f"mesh.{n}={s}" for n, s in sizes.items())
        raise TenureError(f"config keys {keys}: product {fixed} != {num_devices} devices (set one to -1)")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes (GSPMD propagates shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if len(devices) == len(jax.devices()):
        # topology-aware device order on real hardware
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _mesh_axes_for(logical: str | None) -> tuple[str, ...]:
    for name, target in LOGICAL_RULES:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    if logical is None:
        return ()
    raise ValueError(f"logical axis {logical!r} has no rule in tenure.engine.runtime.sharding.LOGICAL_RULES")


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for one param; dims the mesh axes do not divide stay replicated."""
    used: set[str] = set()
    entries = []
    for logical, dim in zip(logical_axes, shape):
        axes = tuple(a for a in _mesh_axes_for(logical) if mesh.shape[a] > 1 and a not in used)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            entries.append(None)
            continue
        used.update(axes)
        entries.append(axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
    """NamedSharding tree (unboxed structure) for a tree of boxed (abstract or real) params."""
    specs = nn.get_partition_spec(boxed_params)  # logical names per leaf, boxes removed
    shapes = nn.unbox(boxed_params)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, spec_for(tuple(spec), x.shape, mesh)),
        specs, shapes, is_leaf=lambda s: isinstance(s, P))


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, given: Callable[[Any], Any] | None = None
                 ) -> tuple[Any, Any]:
    """Runs `init_fn` (returns boxed params) under jit straight into its shardings.

    `given(abstract params)` returns the tree with some leaves replaced by real arrays (the
    pretrained weights): only the leaves it leaves abstract are initialised, so XLA drops the
    random init of the rest (a 135M decoder: 24 s of init saved a run).
    Returns (unboxed params, their NamedSharding tree).
    """
    boxed = jax.eval_shape(init_fn)
    shardings = param_shardings(boxed, mesh)
    if given is None:
        return jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)(), shardings
    leaves, treedef = jax.tree.flatten(given(nn.unbox(boxed)))
    fresh = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.ShapeDtypeStruct)]
    flat_shardings = treedef.flatten_up_to(shardings)

    def init_fresh():
        every = jax.tree.leaves(nn.unbox(init_fn()))  # traced once: the model is big, the fresh leaves many
        return [every[i] for i in fresh]

    made = jax.jit(init_fresh, out_shardings=[flat_shardings[i] for i in fresh])()
    made = dict(zip(fresh, made))
    leaves = [made[i] if i in made else jax.device_put(leaf, sharding)
              for i, (leaf, sharding) in enumerate(zip(leaves, flat_shardings))]
    return jax.tree.unflatten(treedef, leaves), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dim over ("data", "fsdp"); the rest replicated. A prefix for any batch dict."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_params(params_np: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) -> global jax.Arrays laid out by `shardings`."""

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, params_np, shardings)
