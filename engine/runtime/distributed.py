"""Multi-host start-up: every process runs the same program (JAX's own model).

`jax.distributed.initialize` is called only when the environment says this is a
multi-process job: an explicit coordinator (`JAX_COORDINATOR_ADDRESS` with
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`), a SLURM job step with several tasks, or
`TENURE_DISTRIBUTED=1` (set by tpu/launch.sh: JAX auto-detects the TPU slice's workers).
Every process then runs a hang guard (engine/runtime/hangguard.py, `TENURE_HANG_TIMEOUT`): a peer that
dies or stops answering makes the others exit with one line naming it.
"""
from __future__ import annotations

import os

import jax

from tenure.models.errors import TenureError


def _wanted() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return os.environ.get("TENURE_DISTRIBUTED") == "1"


def initialize() -> None:
    """Joins the job's other processes, once; a single process does nothing."""
    if not _wanted() or jax.distributed.is_initialized():
        return
    kwargs = {}
    if address := os.environ.get("JAX_COORDINATOR_ADDRESS"):
        try:
            kwargs = dict(coordinator_address=address,
                          num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["JAX_PROCESS_ID"]))
        except (KeyError, ValueError) as exc:
            raise TenureError(
                "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                f"must be integers too ({exc})") from None
    from tenure.engine.runtime import hangguard
    guard_timeout = hangguard.timeout_from_env()
    # JAX's own heartbeat check aborts a process without naming the peer; ours comes first.
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=max(100, int(3 * guard_timeout)))
    hangguard.start(guard_timeout)


def is_primary() -> bool:
    return jax.process_index() == 0


def print_primary(msg: str) -> None:
    """Prints on the primary process only (one line per run, not one per host)."""
    if is_primary():
        print(msg, flush=True)
