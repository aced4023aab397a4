"""Config drift on resume: which changes since the checkpoint break the run, which are safe.

`compare_for_resume(saved_config, new_config, saved_labels, new_labels)` compares the
`tenure.engine.config.schema.to_dict` dicts key by key (dotted paths; lists of sections by index, e.g.
`stages.1.steps`) and returns `(breaking, safe_notes)`, each a list of one-line strings
naming the key and both values. Everything that is not on the allow-list `SAFE` breaks
the run, so keys added to the config later (sections `tasks:`, `stages:`, ...) are
refused on change until someone decides they are safe.

`compare_for_eval(trained, given)` is the counterpart for `tenure eval` / `tenure export`, which
restore a checkpoint into the model today's config builds: only the keys on `MODEL_DEFINING`
(what the model computes and its parameter tree) must be as trained; data, batch sizes, eval
settings, optimizer, steps and logging may change.
"""
from __future__ import annotations

import fnmatch
import json
from typing import Any

# Keys whose change does not alter what the resumed run computes for the steps it already
# took (or only how it is watched, logged, evaluated, saved and placed). Globs on dotted
# paths; `*` also matches a list index. A key also matches when a prefix of it does.
SAFE: tuple[str, ...] = (
    "run_dir",
    "branch_from",  # only read when a run starts: a resume continues from its own checkpoints
    "logging", "*.logging",
    "train.log_every", "train.eval_every", "train.early_stopping", "train.resume",
    "eval", "*.eval", "*.eval_every", "*.log_every",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_best", "checkpoint.async_save",
    "checkpoint.dir", "checkpoint.enabled",
    "divergence",
    "mesh",  # checkpoints restore into any mesh
    "data.validation", "data.test", "data.eval_batch_size", "*.data.validation", "*.data.test",
    "*.data.eval_batch_size",
    "data.worker_count", "data.read_threads", "data.prefetch",
    "*.data.worker_count", "*.data.read_threads", "*.data.prefetch",
    "task.max_new_tokens", "task.generation_examples", "task.few_shot",
    "*.max_new_tokens", "*.generation_examples", "*.few_shot",
)
# Safe only in one direction: more steps continue the run (the schedule stretches to them).
STEPS_KEYS: tuple[str, ...] = ("train.steps", "stages.*.steps", "stages.*.train.steps")
# Keys that define the model a checkpoint holds: its architecture and numerics, its task heads
# and its parameter tree. A task option added later defines the model until it is put on
# EVAL_ONLY. A staged run's trainability is compared per stage as the stage trained
# (`model_tree`): a stage's own keys over the top-level section's.
MODEL_DEFINING: tuple[str, ...] = (
    "model", "task", "tasks", "heads",
    "trainable.mode", "trainable.lora.rank", "trainable.lora.alpha", "trainable.lora.targets",
    "stages.*.trainable.mode", "stages.*.trainable.lora.rank", "stages.*.trainable.lora.alpha",
    "stages.*.trainable.lora.targets",
)
# Keys under MODEL_DEFINING that choose what is evaluated and how it is scored, or how the same
# model is computed (compute dtype, rematerialisation, scanned layers, attention kernel; dropout is
# off at eval), not the model.
EVAL_ONLY: tuple[str, ...] = (
    "model.dtype", "model.remat", "model.scan_layers", "model.attention", "model.dropout",
    "task.max_new_tokens", "task.generation_examples", "task.few_shot",
    "tasks.*.data", "tasks.*.metric", "tasks.*.mode", "tasks.*.tasks", "tasks.*.limit", "tasks.*.eval_limit",
    "tasks.*.max_new_tokens", "tasks.*.generation_examples", "tasks.*.few_shot",
)
_MAX_SHOWN = 60


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value; dicts and lists of dicts are walked, other lists are leaves."""
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: tree}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    parts = key.split(".")
    prefixes = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes for pattern in patterns)


def _show(value: Any) -> str:
    text = "unset" if value is _MISSING else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


_MISSING = object()


def _labels(labels: Any) -> Any:
    """A LabelVocab JSON string (what checkpoints store), a list, or None -> list or None."""
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except ValueError:
            return labels
    if isinstance(labels, dict) and "labels" in labels:
        labels = labels["labels"]
    if isinstance(labels, dict):  # {task: labels} for several tasks
        return {k: _labels(v) for k, v in sorted(labels.items())}
    return list(labels) if isinstance(labels, (list, tuple)) else labels


STOPPED = " (the stage the run resumes in stopped early: it is not trained further; --restart trains it anew)"


def compare_for_resume(saved_config: dict, new_config: dict, saved_labels: Any = None,
                       new_labels: Any = None, stopped_stage: int | None = None) -> tuple[list[str], list[str]]:
    """(breaking, safe_notes): one line per changed key, e.g. `optim.lr: 0.001 -> 0.0001`.

    Labels (a list, a LabelVocab JSON string, or {task: labels}) must match exactly, order
    included: label i is row i of the classifier. `stopped_stage`: the stage of the checkpoint
    resumed from, where that stage stopped early (early stopping, its guard): more steps or
    patience for it say it is not trained further, rather than that it continues.
    """
    old, new = flatten(saved_config), flatten(new_config)
    breaking, notes = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before == after:
            continue
        line = f"{key}: {_show(before)} -> {_show(after)}"
        stopped = stopped_stage is not None and (key.startswith(("train.steps", "train.early_stopping"))
                                                 or key.startswith(f"stages.{stopped_stage}."))
        if _matches(key, STEPS_KEYS) and isinstance(before, int) and isinstance(after, int):
            if after >= before:
                notes.append(line + (STOPPED if stopped else " (the run continues to the new step count; a "
                                     "decaying learning-rate schedule stretches to it from here on)"))
            else:
                breaking.append(line + " (fewer steps than the saved run: the schedule would "
                                       "jump; use --restart)")
        elif _matches(key, SAFE):
            notes.append(line + (STOPPED if stopped and "early_stopping" in key else ""))
        else:
            breaking.append(line)
    saved, current = _labels(saved_labels), _labels(new_labels)
    if saved != current:
        breaking.append(f"labels: {_show(saved)} -> {_show(current)} (classifier rows follow "
                        "the label order)")
    return breaking, notes


def model_tree(config: dict, computed: list[dict] | None) -> dict:
    """`config` (a `to_dict`) with a staged run's trainability as each stage trained
    (`computed`: RunPlan.computed, which checkpoints record as `stages_computed`): the top-level
    section alone does not say it, and two stages may differ."""
    if config.get("stages") is None or computed is None:
        return config
    tree = {key: value for key, value in config.items() if key not in ("trainable", "stages")}
    tree["stages"] = [{"trainable": stage["trainable"]} for stage in computed]
    return tree


def compare_for_eval(trained: dict, given: dict) -> list[str]:
    """One line per key on MODEL_DEFINING (not on EVAL_ONLY) where `model_tree`s differ, e.g.
    `task.pooling: trained "cls", given "mean"`."""
    old, new = flatten(trained), flatten(given)
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before != after and _matches(key, MODEL_DEFINING) and not _matches(key, EVAL_ONLY):
            changed.append(f"{key}: trained {_show(before)}, given {_show(after)}")
    return changed


def eval_drift_message(changed: list[str], checkpoint: str) -> str:
    """The one-line refusal (TenureError) of restoring `checkpoint` into another model."""
    many = len(changed) > 1
    return (f"{checkpoint}: the config differs from the one the checkpoint was trained with in {len(changed)} "
            f"key{'s' * many} that define{'s' * (not many)} the model: {'; '.join(changed)}; evaluate or "
            "export the checkpoint with the config it was trained with")


def drift_message(breaking: list[str], run_dir: str) -> str:
    """The one-line refusal the loop raises (TenureError) when `breaking` is not empty."""
    return (f"{run_dir}: the config differs from the checkpoint's in {len(breaking)} key"
            f"{'s' if len(breaking) > 1 else ''} that change the run: {'; '.join(breaking)}; "
            "restore them, or start over with --restart (the old run is moved aside)")
