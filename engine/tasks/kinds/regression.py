"""regression: a float target per text or pair (text_target's `target`, or a numeric `label`).

Its Fisher takes a unit-variance Gaussian likelihood, log p(y|x) = -(y - f(x))^2 / 2 + const, so
grad log p = (y - f) grad f: exact E_y[(y - f)^2] = 1 gives F = (grad f)^2; sampled draws
y ~ N(f, 1); empirical uses the label."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tenure.engine.tasks import losses, metrics
from tenure.engine.tasks.kinds.base import TaskKind


class Regression(TaskKind):
    default_labels = 1

    def features(self, featurizer, records, locations, rngs):
        return featurizer.classify(records, locations)

    def synthetic_labels(self, shape, dtype, ids, mask, rng, num_labels, mlm_probability):
        return rng.normal(size=shape).astype(dtype)

    def loss(self, cfg=None):
        return losses.mse

    def reduce(self, outputs, batch):
        return dict(pred=outputs["predictions"].astype(jnp.float32), label=batch["labels"], mask=batch["example_mask"])

    def scores(self, got, label_names):
        return metrics.regression_metrics(got["pred"], got["label"])

    def loglik(self, mode, outputs, batch, keys_B):
        pred_B = outputs["predictions"].astype(jnp.float32)
        if mode == "exact":            # E_y[(y - f)^2] = 1: F = (grad f)^2
            resid_B = jnp.ones_like(pred_B)
        elif mode == "sampled":        # y ~ N(f, 1): y - f ~ N(0, 1)
            resid_B = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(keys_B)
        else:
            resid_B = batch["labels"].astype(jnp.float32) - pred_B
        return jax.lax.stop_gradient(resid_B) * pred_B   # grad = (y - f) grad f


KIND = Regression("regression", "regression", ("text_target", "text_label", "pair"), "pearson", "max",
                  ("pearson", "spearman", "mse"), pack="batch", numeric_labels=True)
