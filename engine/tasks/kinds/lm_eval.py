"""lm_eval: lm-eval harness tasks scored on the run's causal LM; no data, never trained (metric and
direction: the harness's; tenure.engine.tasks.lm_eval_adapter)."""
from __future__ import annotations

from tenure.engine.tasks.kinds.base import TaskKind
from tenure.models.errors import TenureError


class LMEval(TaskKind):
    def loss(self, cfg=None):
        raise TenureError("an lm_eval task is scored, never trained")

    def fisher_error(self, mode):
        return "fisher: an lm_eval task has no data to take a Fisher on"


KIND = LMEval("lm_eval", "causal_lm", (), "", "max", (), harness=True)
