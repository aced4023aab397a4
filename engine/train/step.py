"""The pure train / eval steps and the train state, jitted with explicit shardings.

`train_step(state, batch) -> (state, metrics)` differentiates only the trainable leaves
(frozen ones enter the model under stop_gradient), so no gradient is computed or carried for
them. Gradient accumulation splits the batch into `accum_steps` micro-batches (rows i*k+j go to
micro-batch j, so each one stays spread over the data axes) and averages their gradients in a
`lax.scan`; one call is one optimizer step, and `metrics["step"]` counts optimizer steps.
A batch packed per batch (tenure.engine.data.batch_packing) keeps each micro-batch's examples in its own
rows, so the split holds for it too once `example_row` counts rows of the micro-batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tenure.engine.train.divergence import DivergenceConfig, DivergenceState, guard_step, keep_if_ok, ratio_before_apply
from tenure.engine.tasks.losses import LossFn, total_loss
from tenure.engine.runtime.executables import SharedStep
from tenure.engine.runtime.sharding import batch_sharding, replicated
from tenure.engine.runtime.xla_env import compiler_options
from tenure.engine.train.trainability import path_str


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # int32 optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array         # uint32[2] base key; dropout uses fold_in(rng, step)
    extra: dict = flax.struct.field(default_factory=dict)  # e.g. {"anchor": ..., "fisher": ...}


def _tokens(batch: dict) -> jax.Array:
    """Real tokens in the batch: every "*attention_mask" summed over real examples (a batch packed
    per batch holds only real examples' tokens, in rows that are not examples)."""
    if "example_row" in batch:
        return batch["attention_mask"].sum().astype(jnp.float32)
    mask_B = batch["example_mask"].astype(jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for key, value in batch.items():
        if key.endswith("attention_mask"):
            per_row = value.reshape(value.shape[0], -1).sum(-1).astype(jnp.float32)
            total = total + (per_row * mask_B).sum()
    return total


def _split_micro(batch: dict, k: int) -> dict:
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={k}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    if "example_row" in batch:  # packed: example i*k+j lies in a row r = i'*k+j, row i' of micro-batch j
        batch = dict(batch, example_row=batch["example_row"] // k)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, model: nn.Module, losses: dict[str, LossFn],
               tx: optax.GradientTransformation, lr_schedule: optax.Schedule, trainable_mask: Any,
               accum_steps: int = 1, divergence: DivergenceConfig | None = None) -> tuple[TrainState, dict]:
    leaves, treedef = jax.tree.flatten(state.params)
    trains = treedef.flatten_up_to(trainable_mask)
    trainable = [x for x, t in zip(leaves, trains) if t]

    def loss_fn(trainable_leaves, micro_batch, key):
        it = iter(trainable_leaves)
        full = [next(it) if t else jax.lax.stop_gradient(x) for x, t in zip(leaves, trains)]
        params = treedef.unflatten(full)
        # logits=False: LM / MLM models give their vocabulary projection's inputs, and the
        # loss (tenure.engine.tasks.losses.vocab_ce) projects a chunk at a time (no [B, L, V] logits).
        outputs = model.apply({"params": params}, micro_batch, deterministic=False, logits=False,
                              rngs={"dropout": key})
        return total_loss(losses, params, outputs, micro_batch, state.extra)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    key = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
        (_, metrics), grads = grad_fn(trainable, batch, key)
    else:
        def body(carry, xs):
            index, micro_batch = xs
            (_, m), g = grad_fn(trainable, micro_batch, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, (g, m)), None

        micro = _split_micro(batch, accum_steps)
        (_, metrics_shape), grads_shape = jax.eval_shape(
            grad_fn, trainable, jax.tree.map(lambda x: x[0], micro), key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
        summed, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        grads, metrics = jax.tree.map(lambda x: x / accum_steps, summed)

    it = iter(grads)
    full_grads = treedef.unflatten([next(it) if t else jnp.zeros_like(x) for x, t in zip(leaves, trains)])
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    guarded = divergence is not None and "divergence" in state.extra
    ratio = None
    if guarded and divergence.max_update_ratio is not None:
        updates, ratio = ratio_before_apply(updates, state.params, trains)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    extra = state.extra
    if guarded:
        # Decided on device: a bad update is never applied (skip) and the loop halts on it (halt).
        ok, guard = guard_step(divergence, DivergenceState(**state.extra["divergence"]), metrics["loss"],
                               grad_norm, ratio)
        if divergence.policy == "skip":
            # A skipped update leaves the state as it was. Under `halt` the loop stops on this
            # step's metrics and never saves or evaluates the state after it, so the select (a
            # pass over params and both moments that cannot fuse into the update, since `ok`
            # needs the update's norm: 9% of a MiniLM step) is not paid.
            params = keep_if_ok(ok, params, state.params)
            opt_state = keep_if_ok(ok, opt_state, state.opt_state)
        extra = dict(state.extra, divergence=guard._asdict())
        metrics = dict(metrics, **{f"divergence/{k}": v for k, v in guard._asdict().items()})
    metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(state.step),
                   tokens=_tokens(batch), step=state.step + 1)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics


def eval_step(params: Any, batch: dict, *, model: nn.Module,
              reduce_fn: Callable[[dict, dict], Any] | None = None) -> Any:
    """Model outputs (or `reduce_fn(outputs, batch)`, to keep what leaves the device small)."""
    outputs = model.apply({"params": params}, batch, deterministic=True)
    return outputs if reduce_fn is None else reduce_fn(outputs, batch)


def make_train_step(model: nn.Module, losses: dict[str, LossFn], tx: optax.GradientTransformation,
                    mesh: Mesh, state_shardings: TrainState, *, lr_schedule: optax.Schedule,
                    trainable_mask: Any, accum_steps: int = 1, xla_options: dict | None = None,
                    divergence: DivergenceConfig | None = None):
    """jit(train_step): state stays in its shardings and is donated; metrics come back replicated.
    `xla_options` default to tenure.engine.runtime.xla_env.compiler_options (the dot path for the model's dtype);
    `divergence` guards every update when the state's extra holds a "divergence" state."""
    step = functools.partial(train_step, model=model, losses=losses, tx=tx, lr_schedule=lr_schedule,
                             trainable_mask=trainable_mask, accum_steps=accum_steps, divergence=divergence)
    options = (compiler_options(mesh.devices.flat[0].platform, getattr(model, "dtype", jnp.float32))
               if xla_options is None else xla_options)
    # keep_unused: the state is donated whole, divergence fields the step only writes included, so
    # the executable's arguments are the state and the batch (what `tenure compile` reports).
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnames=("state",),
                     keep_unused=True, compiler_options=options)
    return SharedStep(jitted, options, mesh.devices.flat)


def make_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any,
                   reduce_fn: Callable[[dict, dict], Any] | None = None):
    step = functools.partial(eval_step, model=model, reduce_fn=reduce_fn)
    options = compiler_options(mesh.devices.flat[0].platform, getattr(model, "dtype", jnp.float32))
    jitted = jax.jit(step, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=replicated(mesh),
                     compiler_options=options)
    return SharedStep(jitted, options, mesh.devices.flat)


def like_params_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree holding param-shaped copies (optimizer moments, anchors): a leaf whose
    path ends with a param's path and has its shape gets that param's sharding; others replicate."""
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings)):
        by_path[path_str(path)] = (tuple(p.shape), s)

    def pick(path, leaf):
        parts = path_str(path).split("/")
        for i in range(len(parts)):
            shape, sharding = by_path.get("/".join(parts[i:]), (None, None))
            if sharding is not None and shape == tuple(leaf.shape):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, mesh: Mesh,
               param_shardings: Any, extra: dict | None = None) -> tuple[TrainState, TrainState]:
    """(state, state_shardings): optimizer state created on the mesh, sharded like the params;
    `extra` (the divergence guard's state, EWC / L2-SP anchors) placed like the params it mirrors."""
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = like_params_shardings(abstract_opt, params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, in_shardings=(param_shardings,), out_shardings=opt_shardings)(params)
    extra_shardings = like_params_shardings(extra, params, param_shardings, mesh) if extra else {}
    repl = replicated(mesh)
    shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings, rng=repl,
                           extra=extra_shardings)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl), params=params,
                       opt_state=opt_state, rng=jax.device_put(jax.random.PRNGKey(seed), repl),
                       extra=jax.device_put(extra, extra_shardings) if extra else {})
    return state, shardings


def compiled_flops(jitted_fn, *args) -> float:
    """FLOPs XLA counts for one call (cost_analysis of the compiled executable)."""
    cost = jitted_fn.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])
