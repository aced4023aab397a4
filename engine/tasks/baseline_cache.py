"""`eval.baseline_cache: DIR`: the starting model's scores, computed once for runs that share them.

Every run scores its starting model on every task before training (R's start row, the baseline
of summary.json). The runs of a study that fine-tune one pretrained model with no fresh head
(an LLM's tied LM head) all start from the same weights, so they would compute the same
baseline again and again: minutes each on a real LLM with lm-eval probes. With a cache dir, a
run looks the baseline up by a key of the starting weights' digest and every config section
the scores depend on (model, tasks and data, eval), and writes it there when it computed it.
Weights that differ (a fresh head drawn per seed, another checkpoint) or any changed task
setting give another key. The cache does not know the engine's code: clear it after changing
how tasks are scored.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

from tenure.engine.runtime import atomic, distributed


def key(cfg, weights_digest: str) -> str:
    sections = {name: getattr(cfg, name) for name in ("model", "task", "data", "tasks", "eval")}
    plain = {name: (value.model_dump(mode="json", by_alias=True) if hasattr(value, "model_dump")
                    else {k: v.model_dump(mode="json", by_alias=True) for k, v in value.items()}
                    if isinstance(value, dict) else value)
             for name, value in sections.items()}
    plain["eval"].pop("baseline_cache", None)  # where the cache is does not change the scores
    text = json.dumps({"weights": weights_digest, **plain}, sort_keys=True)
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
