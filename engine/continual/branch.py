"""`branch_from: RUN_DIR`: start a staged run after the stages another, finished run trained.

Methods of a forgetting study differ in what they do from stage B on (EWC, replay, a guard),
so every method's stage A is the same computation. A run of the config cut to stage A is
trained once; each method branches from it: its final checkpoint (weights, optimizer, the
regularisers' trees, the dropout key) and its history (baseline, R's rows, curves) are this
run's state after stage A, and training goes on with stage B as a run from the start would,
bit for bit (tests/test_continual.py).

A branch is refused unless the source's stages are this config's first stages as computed:
the same model, tasks, labels, heads and seed, and per stage the same tasks, steps,
trainability and optimizer, and the same regularisers where they act. A regulariser that has
nothing to act on in a stage does not count there: EWC before any stage has a Fisher, replay
before any earlier task (so `ewc.lambda` or `replay.ratio` set for every stage still branch
from the naive stage A).
"""
from __future__ import annotations

import json
import pathlib

from tenure.engine.runtime import atomic
from tenure.engine.config.schema import Config, saved_config, to_dict
from tenure.engine.runtime.resume_check import compare_for_resume
from tenure.engine.config.plan import plan
from tenure.models.errors import TenureError

# Top-level sections every stage resolves from: compared through the stages they resolve to.
STAGE_DEFAULTS = ("stages", "trainable", "optim", "ewc", "l2sp", "replay", "kl", "method")


def finished_run_checkpoints(run_dir: pathlib.Path, verb: str, key: str = "") -> tuple[pathlib.Path, dict]:
    """(checkpoint directory, summary record) of the finished run at `run_dir`: its summary.json names
    the directory relative to the run dir, so a moved run still works. `verb` ("branch from",
    "interpolate") and `key` (the config key, if any) word the refusals."""
    summary = run_dir / "summary.json"
    record = atomic.read_json(summary, f"{verb} an intact run, or rerun that one to its end")
    if isinstance(record, dict) and "checkpoints" in record and record["checkpoints"] is None:
        raise TenureError(f"{key}{run_dir} was trained with checkpoint.enabled=false: it has no checkpoints to "
                          f"{verb}")
    if not isinstance(record, dict) or not isinstance(record.get("checkpoints"), str):
        raise TenureError(f"{key}{summary}: names no checkpoint directory; {verb} an intact run, "
                          "or rerun that one to its end")
    return run_dir / record["checkpoints"], record


def source_checkpoints(run_dir: str) -> tuple[pathlib.Path, list[str]]:
    """(checkpoint directory, content digest of each stage end's weights) of the finished run at
    `run_dir` (a `branch_from` source)."""
    summary = pathlib.Path(run_dir) / "summary.json"
    if not summary.is_file():
        raise TenureError(f"branch_from: {run_dir} is not a finished run (no {summary.name}; "
                          "branch from a run that ran to its end)")
    directory, record = finished_run_checkpoints(pathlib.Path(run_dir), "branch from", "branch_from: ")
    return directory, list(record.get("stage_digests") or [])


def check_stage_end(source: str, step_dir: pathlib.Path, stage: str, recorded: list[str], digest: str) -> None:
    """Refuses a branch whose checkpoint is not the stage end the source's summary records."""
    if not recorded or recorded[0] is None:
        raise TenureError(f"branch_from: {source}: its summary.json records no content digest for the end of "
                          f"stage {stage} (written before tenure recorded them); train that run again")
    if recorded[0] != digest:
        raise TenureError(f"branch_from: {source}: checkpoint {step_dir} is not the end of stage {stage} its "
                          f"summary.json records (weights digest {digest[:12]}, recorded {recorded[0][:12]}); "
                          "was its checkpoint dir replaced or shared with another run? Branch from an intact run")


def _comparable(cfg: Config, stages: list[dict]) -> dict:
    tree = to_dict(cfg)
    for key in (*STAGE_DEFAULTS, "branch_from"):
        tree.pop(key, None)
    tree["train"].pop("steps", None)  # a single-task run's stage length; staged runs set it per stage
    tree["stages_run"] = stages
    return tree


def check_branch(meta: dict, cfg: Config, computed: list[dict], labels, source: str) -> int:
    """How many stages the source trained (this run starts with the next one), from the extras
    of its final checkpoint (`computed`: what this config's stages compute, RunPlan.computed); a TenureError naming each key that differs when the source's stages
    are not this run's first ones."""
    saved = saved_config(meta, f"branch_from: {source}: its saved config")
    if saved.stages is None:
        raise TenureError(f"branch_from: {source} is a single-task run; branch from a staged run "
                          "(`tasks` + `stages`) cut to the stages this run shares")
    done = len(saved.stages)
    if cfg.stages is None or len(cfg.stages) <= done:
        raise TenureError(f"branch_from: {source} trained {done} stage{'s' * (done > 1)}; this config "
                          f"has {len(cfg.stages or [])}, so nothing would be left to train")
    if "stages_computed" not in meta:
        raise TenureError(f"branch_from: {source}: its checkpoint predates branching (no record of what "
                          "its stages computed); train that stage again")
    if saved.stages[-1].guard is not None:
        raise TenureError(f"branch_from: {source}: its last stage has a forgetting guard, which hands the next "
                          "stage its best weights within budget, not the checkpoint's; branch after a stage without one")
    breaking, _ = compare_for_resume(_comparable(saved, meta["stages_computed"]),
                                     _comparable(cfg, computed[:done]), meta.get("labels"), labels)
    if breaking:
        raise TenureError(f"branch_from: {source}: its first {done} stage{'s' * (done > 1)} differ from "
                          f"this config's in {len(breaking)} key{'s' * (len(breaking) > 1)}: "
                          f"{'; '.join(breaking)}")
    return done


def first_stage_key(cfg: Config) -> str | None:
    """Equal for two configs exactly when a run of either one cut to its first stage can be the
    other's `branch_from`; None when there is no later stage to branch (or it branches already)."""
    if cfg.stages is None or len(cfg.stages) < 2 or cfg.branch_from is not None:
        return None
    tree = _comparable(cfg, plan(cfg).computed[:1])
    for key in ("run_dir", "logging", "checkpoint"):  # where and how it is watched, not what it computes
        tree.pop(key, None)
    return json.dumps(tree, sort_keys=True, default=str)
