"""The one loop every stage runs: jitted steps, and at their cadence the callbacks that
evaluate, checkpoint and log. Nothing here knows what a task, a stage or a metric is."""
from __future__ import annotations

from typing import Callable

from tenure.engine.data.pipeline import to_global_batch


def fit(step_fn, state, train_iter, mesh, *, first: int, last: int, eval_every: int, save_every: int,
        on_metrics: Callable, on_eval: Callable, on_save: Callable, interrupted: Callable[[int], bool]):
    """Runs local steps first..last. `on_metrics(step, metrics)` gets each step's metrics one step
    late (so reading them never stalls the device); `on_eval(step, state) -> stop` runs every
    `eval_every` steps and at `last`; `on_save(step, state)` every `save_every` steps otherwise,
    and after a step where `interrupted(step)` is true (SIGTERM: finish the step, save, stop).
    Returns (state, the last step run, whether on_eval asked to stop, whether interrupted)."""
    pending, step = None, first - 1
    for step in range(first, last + 1):
        state, metrics = step_fn(state, to_global_batch(train_iter.next_batch(step), mesh))
        if pending is not None:
            on_metrics(*pending)
        pending = (step, metrics)
        stop_now = interrupted(step) and step < last
        if step % eval_every == 0 or step == last:
            on_metrics(*pending)
            pending = None
            if on_eval(step, state):
                return state, step, True, False
        elif step % save_every == 0 or stop_now:
            on_metrics(*pending)
            pending = None
            on_save(step, state)
        if stop_now:
            return state, step, False, True
    if pending is not None:
        on_metrics(*pending)
    return state, step, False, False
