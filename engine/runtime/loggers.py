"""Where a run's scalars and texts go: one interface over every configured logger.

  TensorBoard   logging.tensorboard (default on): event files under <run_dir>/tb (tenure.engine.runtime.tblog)
  W&B           logging.wandb: {project: ..., mode: offline|online}: Weights & Biases, the
                optional extra (pip install -e '.[wandb]'); offline runs are written under
                <run_dir>/wandb (`wandb sync` uploads them later)

Only the primary process logs; on the others `run_loggers` returns no logger at all. Every logger
has `scalars(step, values)`, `text(step, tag, text)` and `close()`; `Loggers` fans the calls out.
"""
from __future__ import annotations

import html
import os
from typing import Mapping, Protocol

from tenure.engine.runtime.tblog import TBLogger
from tenure.models.errors import TenureError


class Logger(Protocol):
    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...
    def text(self, step: int, tag: str, text: str) -> None: ...
    def close(self) -> None: ...


class WandbLogger:
    """One W&B run (`section`: the config's logging.wandb). Points carry the run's step as the `step` metric (wandb's own step counts
    calls, and a run logs the best checkpoint's scores after later steps)."""

    def __init__(self, section, run_dir: str | os.PathLike, config: dict):
        try:
            import wandb
        except ImportError:
            raise TenureError("logging.wandb: the wandb package is not installed; install the extra: "
                              "pip install -e '.[wandb]'") from None
        os.makedirs(run_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=section.project, mode=section.mode, dir=str(run_dir), config=config,
                              name=os.path.basename(os.path.abspath(run_dir)))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if values:
            self.run.log({**{k: float(v) for k, v in values.items()}, "step": int(step)})

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>"), "step": int(step)})

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Every configured logger behind one `Logger`."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.scalars(step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        for logger in self.loggers:
            logger.text(step, tag, text)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def run_loggers(logging, run_dir: str | os.PathLike, config: dict, *, primary: bool) -> Loggers:
    """The loggers of a run's `logging` config section (none off the primary process); `config`
    (the run's config as a dict) goes to the loggers that record it."""
    if not primary:
        return Loggers([])
    loggers: list[Logger] = []
    if logging.tensorboard:
        loggers.append(TBLogger(os.path.join(run_dir, "tb"), enabled=True))
    if logging.wandb is not None:
        loggers.append(WandbLogger(logging.wandb, run_dir, config))
    return Loggers(loggers)
