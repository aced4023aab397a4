"""Parameter trees across hosts: abstract targets, host copies, content digests."""
from __future__ import annotations

import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils


def abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def to_host(params):
    """Full numpy copies of (possibly cross-host sharded) params on every process."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def params_digest(params) -> str:
    """SHA-256 of every parameter's path, dtype, shape and bytes: a checkpoint's weights by content."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(to_host(params))[0]:
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}\n".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()
