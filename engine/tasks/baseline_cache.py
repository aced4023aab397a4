"""`eval.baseline_cache: DIR`: the starting model's scores, computed once for runs that share them.

Every run scores its starting model on every task before training (R's start row, the baseline
of summary.json). The runs of a study that fine-tune one pretrained model with no fresh head
(an LLM's tied LM head) all start from the same weights, so they would compute the same
baseline again and again: minutes each on a real LLM with lm-eval probes. With a cache dir, a
run looks the baseline up by a key of the starting weights' digest (LoRA adapters whose B is
still zero with their A zeroed: they add nothing, so LoRA runs of every seed share one) and every config section
the scores depend on (model, tasks and data, eval, the labels each classifier may predict),
and writes it there when it computed it.
Weights that differ (a fresh head drawn per seed, another checkpoint) or any changed task
setting give another key. The cache does not know the engine's code: clear it after changing
how tasks are scored (the key's SCORING is bumped when tenure itself changes that).

The workers of a study start together, so several runs would miss the cache at once and each
compute the same start row (minutes on an LLM). The first to miss it writes a claim file naming
its host and pid; the others of that host wait for its scores instead. A claim whose process is
gone (killed mid-baseline) is taken over; one from another host is not waited on.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket
import time
from collections.abc import Callable

import jax

from tenure.engine.runtime import atomic, distributed
from tenure.engine.runtime.distributed import print_primary

POLL_SECONDS = 2.0
SCORING = 3  # 2: an lm_eval probe's validation documents are held out from R's (version 1 scored R's first ones);
             # 3: the key holds the labels each task may predict (version 2 served heads: shared scores to per_task)


def key(cfg, weights_digest: str, label_masks) -> str:
    """`label_masks`: which labels each task's classifier may predict in the first stage (`heads` and
    the first stage's tasks set them, and the weights do not show them)."""
    sections = {name: getattr(cfg, name) for name in ("model", "task", "data", "tasks", "eval")}
    plain = {name: (value.model_dump(mode="json", by_alias=True) if hasattr(value, "model_dump")
                    else {k: v.model_dump(mode="json", by_alias=True) for k, v in value.items()}
                    if isinstance(value, dict) else value)
             for name, value in sections.items()}
    plain["eval"].pop("baseline_cache", None)  # where the cache is does not change the scores
    text = json.dumps({"weights": weights_digest, "scoring": SCORING, "label_masks": label_masks, **plain},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def lookup(directory: str, cache_key: str) -> dict[str, float] | None:
    path = pathlib.Path(directory) / f"{cache_key}.json"
    if not path.is_file():
        return None
    return atomic.read_json(path, f"delete it (the baseline is then computed again)")["scores"]


def store(directory: str, cache_key: str, scores: dict[str, float]) -> None:
    if distributed.is_primary():
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path / f"{cache_key}.json", json.dumps({"scores": scores}, indent=1))


def get_or_compute(directory: str, cache_key: str, compute: Callable[[], dict[str, float]]
                   ) -> tuple[dict[str, float], bool]:
    """(scores, whether they came from the cache): the cached scores, or `compute()`'s, stored.
    While another process of this host computes them, wait for its result."""
    # a multi-process job's processes compute the row together: none may wait, so none claims
    claim = pathlib.Path(directory) / f"{cache_key}.claim" if jax.process_count() == 1 else None
    held, waited_for = False, None
    while (scores := lookup(directory, cache_key)) is None and claim is not None and not held:
        holder = _claim(claim)
        held = holder is None  # then look once more: the last holder may have stored it just before
        if not held:
            if holder != waited_for:
                print_primary(f"baseline: waiting for {holder}, which is computing it for {directory}")
                waited_for = holder
            time.sleep(POLL_SECONDS)
    try:
        if scores is not None:
            return scores, True
        scores = compute()
        store(directory, cache_key, scores)
        return scores, False
    finally:
        if held:
            claim.unlink(missing_ok=True)


def _claim(claim: pathlib.Path) -> str | None:
    """Takes the claim (None), or names the live process of this host that holds it."""
    claim.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} pid {os.getpid()}"
    mine = claim.with_name(f"{claim.name}.{os.getpid()}")
    mine.write_text(me)
    try:
        while True:
            try:
                os.link(mine, claim)  # atomic: a claim file always holds its holder
                return None
            except FileExistsError:
                pass
            try:
                holder = claim.read_text()
            except FileNotFoundError:  # released meanwhile
                continue
            host, _, pid = holder.partition(" pid ")
            if host == socket.gethostname() and pid.isdigit() and holder != me and _alive(int(pid)):
                return holder
            claim.unlink(missing_ok=True)  # its process is gone (or it is on another host: not waited on)
    finally:
        mine.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True
