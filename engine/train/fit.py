"""The one loop every stage runs: jitted steps, and at their cadence the hooks that evaluate,
checkpoint and log (engine/train/hooks.py). Nothing here knows what a task, a stage or a metric is."""
from __future__ import annotations

from typing import Callable

from tenure.engine.data.pipeline import to_global_batch


def fit(step_fn, state, train_iter, mesh, *, first: int, last: int, log: Callable, evaluate: Callable,
        save: Callable, interrupted: Callable[[int], bool]):
    """Runs local steps first..last. `log(step, metrics)` gets each step's metrics one step late
    (so reading them never stalls the device); `evaluate(step, state) -> stop` runs every
    `evaluate.every` steps and at `last`; `save(step, state)` every `save.every` steps otherwise,
    and after a step where `interrupted(step)` is true (SIGTERM: finish the step, save, stop).
    Returns (state, the last step run, whether evaluate asked to stop, whether interrupted)."""
    pending, step = None, first - 1
    for step in range(first, last + 1):
        state, metrics = step_fn(state, to_global_batch(train_iter.next_batch(step), mesh))
        if pending is not None:
            log(*pending)
        pending = (step, metrics)
        stop_now = interrupted(step) and step < last
        if step % evaluate.every == 0 or step == last:
            log(*pending)
            pending = None
            if evaluate(step, state):
                return state, step, True, False
        elif step % save.every == 0 or stop_now:
            log(*pending)
            pending = None
            save(step, state)
        if stop_now:
            return state, step, False, True
    if pending is not None:
        log(*pending)
    return state, step, False, False
