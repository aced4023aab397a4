"""seq_cls: one class of the label vocabulary per text ([CLS] text [SEP])."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tenure.engine.tasks import losses, metrics
from tenure.engine.tasks.kinds.base import ClassKind
from tenure.models.tasks import MASKED_LOGIT

CLASSIFICATION_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "loss")


class SeqCls(ClassKind):
    def features(self, featurizer, records, locations, rngs):
        return featurizer.classify(records, locations)

    def loss(self, cfg=None):
        return losses.classification_ce

    def reduce(self, outputs, batch):
        logits_BxC = outputs["logits"].astype(jnp.float32)
        nll_B = -jnp.take_along_axis(jax.nn.log_softmax(logits_BxC), batch["labels"][:, None], -1)[:, 0]
        # a gold class the shared head masks (class-incremental, its task not trained yet) has no loss, not ~1e9
        gold_B = jnp.take_along_axis(logits_BxC, batch["labels"][:, None], -1)[:, 0]
        nll_B = jnp.where(gold_B > MASKED_LOGIT / 2, nll_B, jnp.nan)
        return dict(pred=jnp.argmax(logits_BxC, -1), label=batch["labels"], nll=nll_B, mask=batch["example_mask"])

    def scores(self, got, label_names):
        scores = metrics.classification_metrics(got["pred"], got["label"])
        if not np.isnan(got["nll"]).any():
            scores["loss"] = float(got["nll"].mean())
        return scores


KIND = SeqCls("seq_cls", "seq_cls", ("text_label",), "accuracy", "max", CLASSIFICATION_METRICS, labelled=True,
              pack="batch", kl_unit="example", classifies=True, fisher_classes=True)
