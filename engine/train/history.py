"""What a run has measured so far: the baseline, the validation evals and curves, the rows of R.

Checkpoints carry it (extras `history`), a resume or a branch continues it, and summary.json,
forgetting.json and `tenure interpolate` read it. `to_dict` writes the keys the engine has
always written, each only once it has a value, so checkpoints of either form resume."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The order a run first writes them in (a checkpoint's JSON reads the same as before).
_ORDER = ("baseline", "start_row", "curves", "train_loss", "evals", "overfit_warnings", "early_stops",
          "final", "final_step", "R", "stage_ends", "stage_digests", "guard_starts", "R_validation")


@dataclass
class RunHistory:
    baseline: dict | None = None          # every score of the starting model (validation and test)
    start_row: dict | None = None         # task -> R's metric of the starting model
    curves: list = field(default_factory=list)     # {"step", "stage", "scores": task -> validation metric}
    train_loss: list = field(default_factory=list)  # every step's training loss
    evals: list = field(default_factory=list)       # {"step" (stage-local), "stage", <validation scores>}
    overfit_warnings: list = field(default_factory=list)  # {"step", "stage"}
    early_stops: list = field(default_factory=list)       # {"step", "stage"}
    final: dict | None = None             # the scores of the last stage end's result
    final_step: int | None = None         # the run step of that result
    R: list = field(default_factory=list)            # per stage end: task -> R's metric
    stage_ends: list = field(default_factory=list)   # per stage end: its run step
    stage_digests: list = field(default_factory=list)  # per stage end: params_digest (None: not recorded)
    R_validation: list = field(default_factory=list)  # per stage end: task -> validation metric of the
                                                      # same weights (a study selects on these)
    guard_starts: dict | None = None                   # str(stage index) -> guarded task -> validation metric
                                                       # at the stage's start (the forgetting guard's reference)

    def to_dict(self) -> dict:
        out = {}
        for key in _ORDER:
            value = getattr(self, key)
            if value is not None and value != []:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, saved: dict) -> "RunHistory":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def stage_evals(self, index: int) -> list:
        return [e for e in self.evals if e.get("stage", 0) == index]

    def has_row(self, index: int, step: int) -> bool:
        """Whether R's row for stage `index` ending at run step `step` is recorded."""
        return self.stage_ends[index:index + 1] == [step]

    def set_row(self, index: int, row: dict, validation: dict, step: int, digest: str) -> None:
        """R's row of stage `index` and its weights' validation row; a resumed run that extends a
        finished stage replaces them."""
        self.R = self.R[:index] + [row]
        self.R_validation = (self.R_validation + [None] * index)[:index] + [validation]
        self.stage_ends = self.stage_ends[:index] + [step]
        # None: a stage end of a checkpoint written before digests were recorded.
        self.stage_digests = (self.stage_digests + [None] * index)[:index] + [digest]
