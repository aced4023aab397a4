"""Diagonal Fisher information from per-example gradients, and the pruned trees it lives in.

    step = make_fisher_step(model, "seq_cls", "sampled", mask, mesh, param_shardings)
    fisher, n = fisher_diagonal(step, params, global_batches, jax.random.key(0), max_examples=2048)
    fisher = online_update(old_fisher, fisher, gamma=0.9)          # Online EWC across stages

F_i = E_x E_{y ~ p(.|x)} [(d log p(y|x) / d theta_i)^2], the MEAN over examples of SQUARED
PER-EXAMPLE gradients (never the square of a batch gradient; see research/forgetting.md §1.2).

Modes (FISHER_MODES):
  exact      y summed over the classes, weighted by the model's p(y|x) (held constant): C backward
             passes per example, after one forward. Sequence kinds (seq_cls, pair_cls) and
             regression only; token kinds raise TenureError (see below). `classes` limits the
             sum to the classes the task's head could predict (class-incremental: those of the
             tasks trained up to the Fisher task's stage); a masked class has p = 0 and is skipped.
  sampled    one y ~ p(.|x) per example (per labelled position for token kinds): an unbiased
             estimate of the true Fisher, one backward pass per example.
  empirical  y = the data's labels ("empirical Fisher"; cheap, biased away from an optimum).
  batched    the WRONG estimator, kept as a labelled control for studies only: the square of the
             mini-batch MEAN gradient (empirical labels), n_b * gbar_b^2 summed per batch, so
             `fisher_diagonal` returns the example-weighted mean over batches of gbar_b^2. Near an
             optimum it is about F_empirical / B (B = real examples per batch), hence the
             "lambda must be orders of magnitude larger" folklore; away from one it follows the
             mean-gradient direction instead of curvature.

Token kinds (token_cls, mlm, causal_lm, sft). The model factorises over labelled positions t given
the input (teacher forcing: position t of a causal LM sees the TRUE prefix, never a sampled
token), log p(y|x) = sum_t log p(y_t|x). We take, per example, the gradient of that sum,
s = sum_t g_t with g_t = grad log p(y_t|x), and square it: s^2 = sum_t g_t^2 + sum_{s!=t} g_s g_t.
  sampled: each y_t is drawn independently from p(.|x) at its own position, and
    E_{y_t}[g_t] = sum_c p_c grad log p_c = grad sum_c p_c = 0, so every cross term has zero
    expectation (E[g_s g_t] = E[g_s] E[g_t] = 0 for s != t) and E[s^2] = sum_t E[g_t^2]: the
    squared gradient of the summed sampled log-likelihood is an UNBIASED estimate of the
    factorised Fisher sum_t F_t, for one backward pass per example instead of one per token
    (the cross terms add variance, not bias).
  empirical: y_t are the data's tokens, the cross terms do not vanish; this is the empirical
    Fisher of the per-sequence log-likelihood, the cheap fallback.
  exact: needs one backward pass per (token, class); over a vocabulary (mlm, causal_lm, sft) it
    is infeasible, and for token_cls it is L*C passes per example, so both raise TenureError.
NORMALISED PER LABELLED TOKEN: the sums of s^2 are divided by the number of labelled tokens of
the examples used, not by the number of examples, so F = sum_x s_x^2 / sum_x n_x (n_x: labelled
tokens of example x) estimates the MEAN over labelled tokens of the per-token Fisher F_t. That is
the Fisher of the training loss, itself a mean over labelled tokens, so lambda means the same for
short and long sequences (per example it would grow with the labelled tokens per sequence: the
form before this normalisation, which made F about n times larger; docs/forgetting.md says which
numbers that changed).
Only labelled positions count (labels != -100; causal_lm / sft: position t predicts labels[t+1]).

Regression: a unit-variance Gaussian likelihood, log p(y|x) = -(y - f(x))^2 / 2 + const, so
grad log p = (y - f) grad f: exact E_y[(y - f)^2] = 1 gives F = (grad f)^2; sampled draws
y ~ N(f, 1); empirical uses the label.

Embedding (retrieval): a contrastive batch loss has no per-example likelihood, but each retrieval
record carries its own candidates (the positive and its hard negatives, P = 1 + negatives), so
the Fisher is that of the per-example choice p(j | query) = softmax_j(q . p_j / temperature) over
them, the positive being the "label" (index 0): a P-way classification, with the class modes
above (exact sums over the P candidates). Records need at least one hard negative.

The model runs in eval mode (deterministic=True: no dropout). Only the leaves where `mask` is True
are differentiated (the rest enter as constants), so the result is a PRUNED tree: nested dicts
with the params' paths, only masked leaves, empty dicts dropped. Everything is fp32.

Sharding: the jitted step takes params in `param_shardings`, the global batch sharded over the
mesh's data axes (`batch_sharding`), and returns the sums sharded like the matching params (the
pruned param shardings, which are what `tenure.engine.train.step.like_params_shardings` gives for such a tree)
and a replicated count. Per-example keys are fold_in(key, global row), so sampled labels do not
depend on the mesh or on `chunk`: 8 devices and 1 give the same F to fp32 summation order.

Memory: the per-example gradients of a batch are computed in `lax.scan` passes of m examples,
m = the largest divisor of the global batch that is <= chunk * (data x fsdp shards), i.e. at most
`chunk` examples per device at a time (m x |masked theta| live gradients across the mesh).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tenure.engine.runtime.executables import SharedStep
from tenure.engine.runtime.sharding import batch_sharding, replicated
from tenure.engine.tasks.kinds import TaskKind, kind_of
from tenure.models.errors import TenureError

FISHER_MODES = ("exact", "sampled", "empirical", "batched")
FISHER_CHUNK = 8   # examples per device whose gradients are alive at once (make_fisher_step's `chunk`)
_NO_LIMIT = np.int32(np.iinfo(np.int32).max)


# ----------------------------------------------------------------------------- pruned trees

def prune(tree: Any, mask: Any) -> dict:
    """Nested dict keeping only the leaves where `mask` is True; empty dicts are dropped.

    `mask` has the structure of `tree`, or is a prefix of it (a bool at a subtree keeps or drops
    the whole subtree). Works on any tree with the params' dict structure (params, shardings,
    abstract shapes)."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"prune: expected a nested dict, got {type(tree).__name__}")
    out = {}
    for key, value in tree.items():
        m = mask[key]
        if isinstance(m, Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(f"prune: mask has a subtree at {key!r} where the tree has a leaf")
            sub = prune(value, m)
            if sub:
                out[key] = sub
        elif bool(m):
            out[key] = value
    return out


def pick(tree: Any, like: Any, _path: str = "") -> dict:
    """The leaves of `tree` at the paths of the pruned tree `like` (the inverse walk: e.g. the
    current params under a Fisher's paths). KeyError naming the path when `tree` lacks one."""
    out = {}
    for key, sub in like.items():
        path = f"{_path}/{key}" if _path else str(key)
        if not isinstance(tree, Mapping) or key not in tree:
            raise KeyError(f"param {path!r} is in the pruned tree but not in the params")
        out[key] = pick(tree[key], sub, path) if isinstance(sub, Mapping) else tree[key]
    return out


def overlay(tree: Any, pruned: Any) -> Any:
    """`tree` with the leaves present in `pruned` replaced by those of `pruned`."""
    if not pruned:
        return tree
    out = dict(tree)
    for key, sub in pruned.items():
        out[key] = overlay(tree[key], sub) if isinstance(sub, Mapping) else sub
    return out


def online_update(old: Any, new: Any, gamma: float) -> Any:
    """Online EWC precision (Schwarz et al. 2018; Huszar 2018): gamma * old + new, for ONE penalty
    anchored at the latest theta*. `old=None` gives `new`. Pruned trees with different paths (the
    trainable set changed between stages) merge over the union: a leaf only in `old` decays to
    gamma * old, a leaf only in `new` is taken as is."""
    if old is None:
        return new
    out = {}
    for key in list(old) + [k for k in new if k not in old]:
        if key in old and key in new:
            a, b = old[key], new[key]
            if isinstance(a, Mapping) != isinstance(b, Mapping):
                raise ValueError(f"online_update: {key!r} is a leaf in one tree and a subtree in the other")
            if isinstance(a, Mapping):
                out[key] = online_update(a, b, gamma)
            else:
                if tuple(a.shape) != tuple(b.shape):
                    raise ValueError(f"online_update: {key!r} has shape {tuple(a.shape)} then {tuple(b.shape)}")
                out[key] = gamma * a.astype(jnp.float32) + b.astype(jnp.float32)
        elif key in old:
            out[key] = jax.tree.map(lambda a: gamma * a.astype(jnp.float32), old[key])
        else:
            out[key] = jax.tree.map(lambda b: b.astype(jnp.float32), new[key])
    return out


# ----------------------------------------------------------------------------- log-likelihoods

def _check(kind: str, mode: str) -> TaskKind:
    if mode not in FISHER_MODES:
        raise TenureError(f"fisher: mode {mode!r} is not one of {', '.join(FISHER_MODES)}")
    task_kind = kind_of(kind)
    problem = task_kind.fisher_error(mode)
    if problem:
        raise TenureError(problem)
    return task_kind


def _square(tree):
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), tree)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, max(cap, 1)) + 1) if n % d == 0)


# ----------------------------------------------------------------------------- the step

def make_fisher_step(model: Any, kind: str, mode: str, mask: Any, mesh: Mesh, param_shardings: Any,
                     *, chunk: int = FISHER_CHUNK, temperature: float = 0.05, classes: tuple[int, ...] | None = None) -> Callable:
    """jit-compiled `step(params, batch, key, budget=None) -> (sums, count, units)`.

    sums   pruned fp32 tree (masked leaves only) of the sum over the batch's real examples of the
           squared per-example gradients of log p(y|x) (mode `batched`: n * (mean gradient)^2),
           sharded like the matching params;
    count  int32, the real examples used (example_mask > 0, in global row order at most `budget`:
           `fisher_diagonal` uses it to stop at exactly max_examples);
    units  int32, what F is a mean over: the labelled tokens of those examples for token kinds,
           else `count` (module docstring: token kinds are normalised per labelled token).
    `kind` is the task kind (seq_cls, pair_cls, token_cls, mlm, causal_lm, sft, regression);
    `chunk` bounds the examples per device whose gradients are alive at once (module docstring);
    `temperature` scales an embedding task's candidate scores (its InfoNCE temperature);
    `classes`: the class indices exact mode sums over (None: all; `fisher_step.passes` = backward
    passes per example).
    """
    task_kind = _check(kind, mode)
    if chunk < 1:
        raise TenureError(f"fisher: chunk must be >= 1 (got {chunk})")
    if classes is not None and not classes:
        raise TenureError("fisher: the task has no class to sum over")
    if not prune(mask, mask):
        raise TenureError("fisher: the mask selects no parameter (nothing is trainable)")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sum_shardings = (prune(param_shardings, mask) if isinstance(param_shardings, Mapping)
                     else param_shardings)

    def logprob_fn(params, trainable, batch):
        outputs = model.apply({"params": overlay(params, trainable)}, batch, deterministic=True)
        return task_kind.choice_logits(outputs, temperature)

    def per_example(trainable, params, example, key):
        """One example's squared gradient of log p(y|x) (fp32 pruned tree); mode batched: the
        gradient itself (empirical labels), squared only after the batch mean."""
        ex1 = jax.tree.map(lambda x: x[None], example)
        if mode == "exact" and task_kind.fisher_classes:
            logp_1xC, vjp = jax.vjp(
                lambda t: jax.nn.log_softmax(logprob_fn(params, t, ex1)["logits"].astype(jnp.float32), -1),
                trainable)
            p_C = jnp.exp(logp_1xC[0])
            num_classes = p_C.shape[0]
            summed_C = jnp.arange(num_classes) if classes is None else jnp.asarray(classes, jnp.int32)

            def body(acc, c):      # one backward pass per class, forward shared
                (g,) = vjp(jax.nn.one_hot(c, num_classes, dtype=jnp.float32)[None])
                return jax.tree.map(lambda a, x: a + p_C[c] * x, acc, _square(g)), None

            zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), trainable)
            return jax.lax.scan(body, zeros, summed_C)[0]
        target = "empirical" if mode == "batched" else mode
        g = jax.grad(lambda t: task_kind.loglik(target, logprob_fn(params, t, ex1), ex1, key[None])[0])(trainable)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        return g if mode == "batched" else _square(g)

    def step(params, batch, key, budget):
        trainable = prune(params, mask)
        real_B = batch["example_mask"] > 0
        real_B = real_B & (jnp.cumsum(real_B.astype(jnp.int32)) <= budget)
        count = real_B.sum().astype(jnp.int32)
        tokens_B = task_kind.labelled_tokens(batch)
        units = count if tokens_B is None else jnp.where(real_B, tokens_B, 0).sum().astype(jnp.int32)
        size = real_B.shape[0]
        m = _largest_divisor_at_most(size, chunk * shards)
        n = size // m
        # rows i*n + j form pass j: every pass keeps its rows spread over the data axes
        split = lambda x: x.reshape(m, n, *x.shape[1:]).swapaxes(0, 1)
        rows = jnp.arange(size, dtype=jnp.int32)
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)
        xs = (jax.tree.map(split, batch), split(real_B), split(keys))

        def body(acc, x):
            examples, real_m, keys_m = x
            per = jax.vmap(per_example, in_axes=(None, None, 0, 0))(trainable, params, examples, keys_m)
            # where, not multiply: a padding row's garbage (even NaN) must not leak in
            per = jax.tree.map(lambda s: jnp.where(real_m.reshape((-1,) + (1,) * (s.ndim - 1)), s, 0.0).sum(0), per)
            return jax.tree.map(jnp.add, acc, per), None

        zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), trainable)
        sums = jax.lax.scan(body, zeros, xs)[0]
        if mode == "batched":   # n * (mean gradient)^2 = (sum of gradients)^2 / n
            sums = jax.tree.map(lambda s: jnp.square(s) / jnp.maximum(count, 1), sums)
        return sums, count, units

    jitted = SharedStep(jax.jit(step, in_shardings=(param_shardings, batch_sharding(mesh), replicated(mesh),
                                                    replicated(mesh)),
                                out_shardings=(sum_shardings, replicated(mesh), replicated(mesh))),
                        None, mesh.devices.flat)

    def fisher_step(params, batch, key, budget=None):
        return jitted(params, batch, key, _NO_LIMIT if budget is None else np.int32(budget))

    fisher_step.jitted = jitted
    fisher_step.kind, fisher_step.mode, fisher_step.chunk = kind, mode, chunk
    fisher_step.passes = ((len(classes) if classes is not None else "C")
                          if mode == "exact" and task_kind.fisher_classes else 1)
    return fisher_step


def fisher_diagonal(step_fn: Callable, params: Any, batches: Iterable[dict], key: jax.Array,
                    max_examples: int | None = None) -> tuple[Any, int]:
    """(F, count): the pruned fp32 MEAN over real examples of the squared per-example gradients
    (token kinds: their sum divided by the examples' labelled tokens, see the module docstring).

    Iterates the global batches (dicts of global arrays, or host numpy arrays on one process),
    batch i with key fold_in(key, i). With `max_examples` the batch that crosses the limit is
    TRIMMED (its real rows past the limit, in global row order, are masked out inside the step),
    so exactly min(max_examples, available) examples are used, and no batch is drawn after the
    limit is reached. TenureError when there is no real example."""
    if max_examples is not None and max_examples < 1:
        raise TenureError(f"fisher: examples must be >= 1 (got {max_examples})")
    total, count, units = None, 0, 0
    for i, batch in enumerate(batches):
        budget = None if max_examples is None else max_examples - count
        sums, n, u = step_fn(params, batch, jax.random.fold_in(key, i), budget)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        count = count + n if max_examples is None else count + int(n)
        units = units + u
        if max_examples is not None and count >= max_examples:
            break
    count, units = int(count), int(units)
    if total is None or count == 0:
        raise TenureError("fisher: the batches hold no real example (example_mask all 0)")
    if units == 0:
        raise TenureError("fisher: the examples hold no labelled token (labels all -100)")
    return jax.tree.map(lambda s: s / units, total), count
