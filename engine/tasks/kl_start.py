"""The KL to the starting model on a stage's own inputs, on the eval cadence (`eval.kl_to_start`).

KL(p_start(.|x) || p_theta(.|x)) averaged over the kind's KL unit (examples; labelled tokens;
positions that predict a label) of each trained task's curve split (validation, else test):
Shenfeld et al. (2025) found it predicts forgetting across methods where the distance in weight
space does not. The starting model is the run's starting params (pretrained backbone, fresh
heads) on the task's own model; both forward passes run in eval mode (no dropout). It costs a
second forward pass over those batches per evaluation. Beside it, the distance in weight space to
the start, ||theta - theta_start||_2 over the backbone (a LoRA layer counts its merged weight's
change), so that a study can set the two predictors side by side."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tenure.engine.data.pipeline import to_global_batch
from tenure.engine.runtime.sharding import batch_sharding, replicated
from tenure.engine.tasks.kinds import KINDS
from tenure.engine.tasks.losses import kl_and_weights
from tenure.engine.continual.regularizers import distance_sq


def _kl_sums(params, start_params, batch, *, model, unit):
    logits = model.apply({"params": params}, batch, deterministic=True)["logits"]
    start_logits = model.apply({"params": start_params}, batch, deterministic=True)["logits"]
    kl, weights = kl_and_weights(start_logits, logits, batch, unit, batch["example_mask"].astype(jnp.float32))
    return (kl * weights).sum(), weights.sum()


class KLToStart:
    """`measure(params) -> {task: KL}` for the tasks among `names` whose kind has a predictive
    distribution and that have a validation or test split."""

    def __init__(self, tasks, names, models: dict, start_params, mesh, param_shardings, lora_scale=None):
        self.start_params, self.mesh = start_params, mesh
        self._distance = jax.jit(lambda p, s: jnp.sqrt(distance_sq(p["backbone"], s["backbone"], lora_scale)),
                                 out_shardings=replicated(mesh))
        self.fns, self.batches = {}, {}
        for name in names:
            run_task = tasks.by_name[name]
            unit = KINDS[run_task.task.spec.kind].kl_unit
            split = next((s for s in ("validation", "test") if s in run_task.eval_batches), None)
            if unit is None or split is None:
                continue
            self.batches[name] = run_task.eval_batches[split]
            self.fns[name] = jax.jit(functools.partial(_kl_sums, model=models[name], unit=unit),
                                     in_shardings=(param_shardings, param_shardings, batch_sharding(mesh)),
                                     out_shardings=replicated(mesh))

    def __call__(self, params) -> dict[str, float]:
        out = {}
        for name, fn in self.fns.items():
            sums = [fn(params, self.start_params, to_global_batch(b, self.mesh)) for b in self.batches[name]]
            total, weight = (float(sum(float(s[i].addressable_data(0)) for s in sums)) for i in (0, 1))
            out[name] = total / max(weight, 1.0)
        return out

    def distance(self, params) -> float:
        """||theta - theta_start||_2 over the backbone."""
        return float(self._distance(params, self.start_params).addressable_data(0))
