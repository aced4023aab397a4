"""Compiled steps shared by every stage and run of one process.

`jax.jit` keeps executables per function object, and a run builds new train / eval step closures
for every stage; a study that runs its runs in one process builds them again for every run. Their
XLA programs are often identical (same model, shapes, optimizer, schedule), and on CPUs where the
dots go through oneDNN this jaxlib cannot serialise the executables into the persistent
compilation cache, so each of those closures paid a full compile (a MiniLM train step: 5-7 s per
batch shape). Here a step is looked up by its lowered program: the StableHLO text (constants
included, source locations not), the argument and result pytrees, the compiler options and the
devices. Equal keys are the same computation, so reusing the executable cannot change a result.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Any

import jax

_CAPACITY = 32   # executables kept (least recently used dropped); a study cell needs a handful
_EXECUTABLES: collections.OrderedDict[str, jax.stages.Compiled] = collections.OrderedDict()
STATS = {"compiled": 0, "reused": 0}


def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((getattr(x, "shape", ()), getattr(x, "dtype", type(x)), getattr(x, "weak_type", False),
                           getattr(x, "sharding", None)) for x in leaves)


def program_key(lowered: jax.stages.Lowered, options: dict | None, devices: Any) -> str:
    """What decides the executable: program text, argument / result trees, options, devices."""
    digest = hashlib.sha256(lowered.as_text(debug_info=False).encode())
    for part in (lowered.in_tree, lowered.out_tree, sorted((options or {}).items()), [d.id for d in devices]):
        digest.update(repr(part).encode())
    return digest.hexdigest()


def compile_shared(lowered: jax.stages.Lowered, options: dict | None, devices: Any) -> jax.stages.Compiled:
    key = program_key(lowered, options, devices)
    compiled = _EXECUTABLES.get(key)
    if compiled is None:
        compiled = _EXECUTABLES[key] = lowered.compile()
        STATS["compiled"] += 1
        while len(_EXECUTABLES) > _CAPACITY:
            _EXECUTABLES.popitem(last=False)
    else:
        _EXECUTABLES.move_to_end(key)
        STATS["reused"] += 1
    return compiled


class SharedStep:
    """A jitted step whose executables come from the process-wide table above.

    Called like the jitted function; `lower` is the jitted function's (so `tenure compile` and
    `tenure bench` see the same program). A new argument signature (shapes, dtypes, shardings)
    lowers once and then calls the shared executable directly.
    """

    def __init__(self, jitted: Any, options: dict | None, devices: Any):
        self.jitted, self.options, self.devices = jitted, options, tuple(devices)
        self._by_signature: dict[tuple, jax.stages.Compiled] = {}

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, *args):
        signature = _signature(args)
        compiled = self._by_signature.get(signature)
        if compiled is None:
            compiled = compile_shared(self.jitted.lower(*args), self.options, self.devices)
            self._by_signature[signature] = compiled
        return compiled(*args)
