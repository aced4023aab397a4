"""Orbax checkpoints: train state, per-process data-iterator state and JSON extras per step.

One step directory holds three items:
- `state`: the train-state pytree (sharded jax.Arrays; restored into any target sharding),
- `data`:  the data iterator's JSON state, one file per process (`process_{i}-of-{n}.json`),
- `extra`: a JSON dict (config, label vocab, rng key data, metrics), written by the primary.
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never replaces or deletes the previous good step.

Safety rules (issue 10):
- The engine only deletes what it wrote. A checkpoint directory it creates gets a marker
  file (`MARKER`); a non-empty directory without it is refused (orbax would otherwise
  treat a user's `2023/`, `2024/` folders as steps and may garbage-collect them).
- A state with a non-finite floating-point value is never saved (`NonFiniteStateError`),
  so a diverged run cannot push the good checkpoints out of `keep`.
- A checkpoint directory belongs to one run (issue 25): the marker records its owner, the
  run dir, relative to the checkpoint directory (so a run moved with `mv` still owns its
  own), and another run dir is refused, naming the owner.
"""
import dataclasses
import datetime
import json
import logging
import os
import re
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies
from pydantic import BaseModel, ConfigDict, Field

from tenure.engine.runtime.runlock import LOCK_NAME
from tenure.models.errors import TenureError


class CheckpointConfig(BaseModel):
    """The `checkpoint` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="false: write no checkpoints (a killed run starts over; nothing to "
                          "resume, branch from or evaluate later); refused for a run that ends on its best "
                          "checkpoint (single-task, or checkpoint.keep_best)")
    dir: str | None = Field(None, description="checkpoint directory; default <run_dir>/checkpoints")
    every_steps: int = Field(1000, ge=1, description="save every this many train steps")
    keep: int = Field(3, ge=1, description="how many of the most recent checkpoints to keep")
    keep_best: bool = Field(False, description="also keep the best checkpoint by the eval metric "
                            "(eval.metric / eval.mode)")
    async_save: bool = Field(True, description="write in a background thread while training goes on")

    def resolved_dir(self, run_dir: str | os.PathLike) -> Path:
        return Path(self.dir).expanduser() if self.dir else Path(run_dir) / "checkpoints"


def _process_json(directory: str | os.PathLike) -> Path:
    return Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _ProcessJsonHandler(ocp.CheckpointHandler):
    """Every process writes its own JSON file (data iterators are per-process).

    Saving goes through orbax so the file lands inside the atomic step directory; restoring
    reads the file directly (see `Checkpointer._read_data_state`).
    """

    def save(self, directory, args: "DataStateSave"):
        _process_json(directory).write_text(json.dumps(args.state, indent=1, sort_keys=True))

    def restore(self, directory, args=None):
        return json.loads(_process_json(directory).read_text())


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


# Orbax requires a restore-args type for every handler it saves with.
@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _jsonable(value: Any) -> Any:
    """Arrays (e.g. rng key data) become lists and numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(value).tolist()
    return value


MARKER = "tenure-checkpoints.json"
"""The file that makes a directory tenure's checkpoint directory (see `claim_directory`)."""


class NonFiniteStateError(TenureError):
    """`Checkpointer.save` refused a state with NaN/Inf values; `leaves` names them."""

    def __init__(self, message: str, step: int, leaves: list[str]):
        super().__init__(message)
        self.step, self.leaves = step, leaves


def _os_cause(error: BaseException | None) -> OSError | None:
    """The first OSError with an errno in the exception chain (orbax wraps them)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error
        error = error.__cause__ or error.__context__
    return None


def _one_line(error: BaseException) -> str:
    """`Type: first line`; an OSError anywhere in the chain is named by its path and cause
    ("No space left on device"), which a long first line must not cut off."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    cause = _os_cause(error)
    code = re.search(r"os_error_code='(\d+)'", first)  # tensorstore (OCDBT) I/O errors
    if cause is None and code:
        paths = re.findall(r'"(/[^"]+)"', first)
        where = f": {paths[-1]}" if paths else ""
        status = first.split(":", 1)[0]
        return f"{type(error).__name__}: {status}: [Errno {code[1]}] {os.strerror(int(code[1]))}{where}"
    if cause is not None:
        where = f": {cause.filename}" if cause.filename else ""
        reason = cause.strerror or os.strerror(cause.errno)
        return f"{type(cause).__name__}: [Errno {cause.errno}] {reason}{where}"
    return f"{type(error).__name__}: {first[:300]}"


class _DropOrbaxErrorTracebacks(logging.Filter):
    """Orbax logs every failed background save with a full traceback from each of its
    threads, then raises the same error in `wait_until_finished`, which `Checkpointer`
    turns into one line. Drop those ERROR records so stderr carries only that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        # Also the warning on every save between evals of a keep_best run: those steps carry no
        # metric by design (they are kept for resuming, by the latest-N policy), and the notes on
        # opening a directory read-only (eval, export, a branch's source), which it is by design.
        message = record.getMessage()
        return record.levelno < logging.ERROR and not any(
            note in message for note in ("did not provide metrics", "read_only=True", "is read only"))


def _late_write_callback(exc_type, exc, tb) -> bool:
    """After a failed save (a full disk), orbax closes its event loop while tensorstore still
    completes the step's other writes; each completion's callback finds the loop closed and
    prints a traceback ("Event loop is closed"). The save's error is reported as one line already."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(tb)
    return bool(frames) and frames[0].name == "call_soon_threadsafe"


def _quiet_orbax_errors() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxErrorTracebacks) for f in logger.filters):
        logger.addFilter(_DropOrbaxErrorTracebacks())
    if not getattr(sys.excepthook, "drops_late_write_callbacks", False):
        previous = sys.excepthook

        def excepthook(exc_type, exc, tb):
            if not _late_write_callback(exc_type, exc, tb):
                previous(exc_type, exc, tb)

        excepthook.drops_late_write_callbacks = True
        sys.excepthook = excepthook
    # The same callbacks, when tensorstore's threads call them, end in the unraisable hook.
    if not getattr(sys.unraisablehook, "drops_late_write_callbacks", False):
        previous_unraisable = sys.unraisablehook

        def unraisablehook(unraisable):
            if not _late_write_callback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
                previous_unraisable(unraisable)

        unraisablehook.drops_late_write_callbacks = True
        sys.unraisablehook = unraisablehook


def _looks_like_old_tenure_step(entry: Path) -> bool:
    """Step directories of checkpoint dirs written before the marker existed."""
    name = entry.name
    if ".orbax-checkpoint-tmp" in name or (name.endswith(".broken") and name[:-7].isdigit()):
        return entry.is_dir()
    return (name.isdigit() and entry.is_dir() and (entry / "_CHECKPOINT_METADATA").is_file()
            and (entry / "extra").is_dir())


def directory_problem(directory: Path) -> str | None:
    """Why tenure may not write checkpoints into `directory` (None: it may)."""
    if not directory.exists():
        return None
    if not directory.is_dir():
        return f"checkpoint.dir {directory} is a file, not a directory"
    if (directory / MARKER).is_file():
        return None
    entries = [e for e in directory.iterdir() if not e.name.startswith(LOCK_NAME)]
    if not entries or all(_looks_like_old_tenure_step(e) for e in entries):
        return None
    shown = ", ".join(sorted(e.name for e in entries)[:3]) + (", ..." if len(entries) > 3 else "")
    return (f"checkpoint.dir {directory} is not empty ({shown}) and is not a tenure checkpoint "
            f"directory (no {MARKER}); tenure deletes old steps in its checkpoint directory, so "
            "choose a new or empty directory")


def _marker(directory: Path) -> dict:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return {}  # an unreadable marker is rewritten (it only ever records the owner)


def owner_problem(directory: Path, owner: Path) -> str | None:
    """Why the run at `owner` may not use checkpoint directory `directory` (None: it may)."""
    recorded = _marker(directory).get("run_dir") if (directory / MARKER).is_file() else None
    if recorded is None:
        return None
    theirs = (directory / recorded).resolve()
    if theirs == owner.resolve():
        return None
    return (f"checkpoint.dir {directory} belongs to the run in {theirs} (its {MARKER}); a checkpoint directory "
            f"holds one run's checkpoints, and this run's keep policy would delete that run's: choose another "
            f"checkpoint.dir, or resume that run with run_dir={theirs}")


def claim_directory(directory: Path, owner: Path | None = None) -> None:
    """Refuses a non-empty directory that is not tenure's, or one another run dir owns
    (TenureError naming it); creates the directory and its marker (recording `owner`, the
    run dir) otherwise. Every process checks before the primary writes."""
    problem = directory_problem(directory) or (owner_problem(directory, owner) if owner is not None else None)
    if not _all_processes_ok(problem is None):
        raise TenureError(problem or f"checkpoint.dir {directory} was refused on another process")
    recorded = _marker(directory).get("run_dir")
    if jax.process_index() == 0 and (not (directory / MARKER).is_file() or (owner is not None and recorded is None)):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            marker = {"written_by": "tenure", "what": "orbax checkpoint steps of one run",
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "host": socket.gethostname(), "pid": os.getpid()}
            if owner is not None:
                marker["run_dir"] = os.path.relpath(Path(owner).absolute(), directory)
            tmp = directory / f".{MARKER}.tmp"
            tmp.write_text(json.dumps(marker, indent=1) + "\n")
            tmp.replace(directory / MARKER)
        except OSError as error:
            raise TenureError(f"checkpoint.dir {directory}: cannot create it: {_one_line(error)}") from None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tenure_checkpoint_claim")


def _path_name(path) -> str:
    """`params/encoder/kernel` for a jax key path (dict keys, attributes, indices)."""
    parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(p) for p in parts)


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of `tree` holding a NaN or Inf (one device reduction
    and one host transfer for the whole tree)."""
    pairs = [(_path_name(path), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
             if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not pairs:
        return []
    flags = _finite_flags([leaf for _, leaf in pairs])
    if jax.process_count() > 1 and not flags.is_fully_addressable:
        flags = multihost_utils.process_allgather(flags, tiled=True)
    return [name for (name, _), ok in zip(pairs, np.asarray(flags)) if not ok]


def _all_processes_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def split_checkpoint_path(path: str | os.PathLike) -> tuple[Path, int | None]:
    """`--checkpoint PATH` names a run directory, its checkpoints directory or one step in it."""
    path = Path(path)
    if not path.is_dir():
        raise TenureError(f"checkpoint directory not found: {path} (give a run dir, its checkpoints dir or one "
                          "step's dir, e.g. RUN/checkpoints/200)")
    if path.name.isdigit() and (path / "_CHECKPOINT_METADATA").exists():
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    return path, None


class _PinnedStep(policies.PreservationPolicy):
    """Preserves the one step `Checkpointer.pin` names."""

    def __init__(self):
        self.step: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [info.step == self.step for info in checkpoints]


class Checkpointer:
    """Saves and restores train state, data-iterator state and extras with orbax.

    Every process calls every method; orbax coordinates the processes and only the
    primary writes shared metadata. Use it as a context manager (or call `close()` in a
    `finally`): a process that exits with a save in flight and no close gets orbax's
    "cannot schedule new futures" tracebacks and loses that step (Python 3.12 allows no new
    threads at shutdown, so no exit hook can finish it).
    """

    def __init__(
        self,
        config: CheckpointConfig | None,
        directory: str | os.PathLike,
        *,
        best_metric: str = "validation/accuracy",
        best_mode: Literal["max", "min"] = "max",
        read_only: bool = False,
        owner: str | os.PathLike | None = None,
    ):
        """`owner`: the run dir whose checkpoints these are (recorded, and checked, in the marker)."""
        self.config = config or CheckpointConfig()
        self.best_metric = best_metric
        self.read_only = read_only
        self.restored_step: int | None = None
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise TenureError(f"checkpoint directory not found: {self.directory}")
        if not read_only:
            claim_directory(self.directory, Path(owner) if owner is not None else None)
        _quiet_orbax_errors()
        cfg = self.config
        self._pinned = _PinnedStep()
        # "Any" keeps the latest `keep` steps (resume), the pinned one (a forgetting guard's pick)
        # and, with keep_best, the best one (export).
        kept = [policies.LatestN(n=cfg.keep), self._pinned]
        best_fn = None
        if cfg.keep_best:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            kept.append(policies.BestN(
                get_metric_fn=best_fn,
                reverse=best_mode == "min",
                n=1,
                keep_checkpoints_without_metrics=False,
            ))
        preservation = policies.AnyPreservationPolicy(kept)
        options = ocp.CheckpointManagerOptions(
            # Orbax's default also saves the first step of a fresh run; we save only on
            # multiples of every_steps (or force=True), plus when JAX signals preemption.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(cfg.every_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=preservation,
            enable_async_checkpointing=cfg.async_save,
            # A crash mid-save leaves `<step>.orbax-checkpoint-tmp-*`; drop it on the next start.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # orbax drops those in a background thread and waits for it only at the next save: a run that
        # restores and stops (or a loaded host) could leave them; wait here, as the start it is
        # (a private method: orbax-checkpoint is pinned in pyproject.toml)
        self._manager._maybe_await_cleanup_tmp_directory()
        self._closed = False

    @classmethod
    def open(
        cls, path: str | os.PathLike, config: CheckpointConfig | None = None, **ranking
    ) -> tuple["Checkpointer", int | None]:
        """A read-only checkpointer for `--checkpoint PATH`, and the step PATH names (if any).

        Pass the run's config and `best_metric`/`best_mode` so `best_step()` ranks the same way.
        """
        directory, step = split_checkpoint_path(path)
        return cls(config, directory, read_only=True, **ranking), step

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict | None = None,
        extra: dict | None = None,
        *,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `step` (async by default); False if `every_steps` skips this step.

        `metrics` (e.g. {"validation/accuracy": 0.91}) rank checkpoints for keep_best and
        come back as extra["metrics"]. Use force=True to save off the every_steps grid.

        Raises NonFiniteStateError (a TenureError; nothing is written, no older step is
        evicted) when a floating-point leaf of `state` holds NaN or Inf: the loop reports it
        and halts. The check is one device reduction and one host sync per saved step.
        """
        if not (force or self._manager.should_save(step)):
            return False
        bad = nonfinite_leaves(state)
        if bad:
            kept = self.latest_step()
            raise NonFiniteStateError(
                f"checkpoint step {step} not saved: non-finite values in {len(bad)} arrays "
                f"(first: {bad[0]}); the newest saved checkpoint is "
                + (f"step {kept} in {self.directory}" if kept is not None else "none"), step, bad)
        extra = _jsonable(extra or {})
        if metrics is not None:
            extra["metrics"] = _jsonable(metrics)
        items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
        if data_state is not None:
            items["data"] = DataStateSave(_jsonable(data_state))
        try:
            return self._manager.save(
                step, args=ocp.args.Composite(**items), metrics=self._tracked(extra), force=force
            )
        except Exception as error:
            raise TenureError(
                f"checkpoint save of step {step} to {self.directory} failed: {_one_line(error)}"
            ) from error

    def _tracked(self, extra: dict) -> dict | None:
        metrics = extra.get("metrics") or {}
        if self.config.keep_best and self.best_metric in metrics:
            return {self.best_metric: float(metrics[self.best_metric])}
        return None

    def wait(self) -> None:
        """Blocks until the background save is committed; raises if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._manager.reload()  # orbax forgets the kept steps after a failed async save
            raise TenureError(
                f"checkpoint save to {self.directory} failed: {_one_line(error)}"
            ) from error

    def delete_all(self) -> None:
        """Deletes every step (an explicit overwrite of this run's own checkpoints)."""
        for step in self.all_steps():
            self._manager.delete(step)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def pin(self, step: int | None) -> None:
        """Keeps checkpoint `step` whatever `keep` says (None: keeps none beyond it), from the
        next save on. Orbax picks the steps to delete when a save starts and deletes them once
        that save is committed, so pin a step before the save whose extras name it."""
        self._pinned.step = step

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` value; None without keep_best or metrics."""
        if not self.config.keep_best:
            return None
        return self._manager.best_step()

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, Any, dict]:
        """Returns (state, data_state, extra) of `step` (default: latest).

        `abstract_state` is a pytree of jax.ShapeDtypeStruct whose shardings say where the
        restored arrays go; it may differ from the sharding the checkpoint was saved with.
        data_state is None when the step was saved without one.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise TenureError(f"no checkpoint found in {self.directory}")
        data_state = self._read_data_state(step)
        state, extra = self._restore_state_and_extra(step, abstract_state)
        self.restored_step = step
        return state, data_state, extra

    def read_extra(self, step: int) -> dict:
        """The JSON extras of `step` alone (what a resume needs to know before building the state)."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        except Exception as error:
            raise self._unreadable(step, _one_line(error)) from error

    def latest_readable_extra(self, log: Callable[[str], None] = print) -> dict:
        """`read_extra` of the newest step whose extras read back; newer ones that do not are
        logged and set aside as `<step>.broken`, as `restore_latest_good` does for their arrays."""
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                extra, problem = self.read_extra(step), None
            except TenureError as error:
                extra, problem = None, str(error)
            if _all_processes_ok(problem is None):
                self._set_aside(skipped)
                return extra
            log(f"skipping checkpoint step {step}: {problem or 'unreadable on another process'}")
            skipped.append(step)
        raise TenureError(f"no restorable checkpoint in {self.directory}")

    def _unreadable(self, step: int, reason: str) -> TenureError:
        return TenureError(f"checkpoint {self.step_dir(step)} (step {step}) is unreadable: {reason}")

    def _read_data_state(self, step: int) -> Any:
        """This process's data-iterator state; local file I/O only, no collectives."""
        if not self.step_dir(step).is_dir():
            raise TenureError(f"checkpoint step {step} not found in {self.directory}")
        data_dir = self.step_dir(step) / "data"
        if not data_dir.is_dir():
            return None
        filename = _process_json(data_dir)
        if not filename.exists():
            raise self._unreadable(
                step, f"{filename} missing (was it written with a different process count?)"
            )
        try:
            return json.loads(filename.read_text())
        except ValueError as error:
            raise self._unreadable(step, f"{filename}: {_one_line(error)}") from error

    def _restore_state_and_extra(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as error:
            raise self._unreadable(step, _one_line(error)) from error
        return restored["state"], restored["extra"]

    def restore_latest_good(
        self, abstract_for: Callable[[dict], Any], log: Callable[[str], None] = print
    ) -> tuple[Any, Any, dict]:
        """Like `restore()` of the newest step that reads back, skipping (and logging) broken
        ones; `restored_step` says which step it was. `abstract_for(extras)`: the restore target
        of a step with those extras (an older step may hold another stage's state).

        All processes agree on each step before the collective orbax restore starts, so
        they never resume from different steps. Broken steps newer than the restored one are
        renamed `<step>.broken` (kept for inspection), so training can save those steps again.
        """
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                data_state, problem = self._read_data_state(step), None
            except TenureError as error:
                data_state, problem = None, str(error)
            if _all_processes_ok(problem is None):
                try:  # extras are read by every process together (orbax), so only once all have their data state
                    extra = self.read_extra(step)
                except TenureError as error:
                    problem = str(error)
            if _all_processes_ok(problem is None):
                target = abstract_for(extra)
                try:
                    state, extra = self._restore_state_and_extra(step, target)
                    self.restored_step = step
                    self._set_aside(skipped)
                    return state, data_state, extra
                except TenureError as error:
                    problem = str(error)
            log(f"skipping checkpoint step {step}: {problem or 'unreadable on another process'}")
            skipped.append(step)
        raise TenureError(f"no restorable checkpoint in {self.directory}")

    def _set_aside(self, steps: list[int]) -> None:
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            for step in steps:
                self.step_dir(step).rename(self.directory / f"{step}.broken")
        multihost_utils.sync_global_devices("tenure_checkpoint_set_aside")
        self._manager.reload()

    def close(self, quiet: bool = False) -> None:
        """Waits for the in-flight save (so it is committed, or its temporary directory is
        left for the next start to drop), then stops orbax's threads. A failed save raises
        one TenureError line, unless `quiet` (an error is already on its way out)."""
        if self._closed:
            return
        self._closed = True
        error = None
        try:
            self.wait()
        except TenureError as failed:
            error = failed
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 - closing after a failed save: nothing left to save
            pass
        if error is not None and not quiet:
            raise error

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error exit the save in flight still completes (or is discarded cleanly), and
        # the original error stays the one reported.
        self.close(quiet=exc_type is not None)
