"""token_cls: a tag per word (BIO); the first sub-token of a word carries it, the rest -100."""
from __future__ import annotations

import jax.numpy as jnp

from tenure.engine.tasks import losses, metrics
from tenure.engine.tasks.kinds.base import TokenKind


class TokenCls(TokenKind):
    def features(self, featurizer, records, locations, rngs):
        return featurizer.token_tags(records, locations)

    def loss(self, cfg=None):
        return losses.token_ce

    def reduce(self, outputs, batch):
        return dict(pred=jnp.argmax(outputs["logits"], -1), label=batch["labels"], mask=batch["example_mask"])

    def scores(self, got, label_names):
        return metrics.token_labelling_metrics(got["pred"], got["label"], label_names)


KIND = TokenCls("token_cls", "token_cls", ("token_tags",), "f1", "max",
                ("precision", "recall", "f1", "token_accuracy"), labelled=True, kl_unit="token")
