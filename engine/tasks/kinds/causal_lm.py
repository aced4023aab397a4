"""causal_lm: next-token prediction on text; labels = input_ids (the loss shifts), EOS appended."""
from __future__ import annotations

import numpy as np

from tenure.engine.data.batch_spec import IGNORE
from tenure.engine.tasks import losses
from tenure.engine.tasks.kinds.base import LANGUAGE_METRICS, LanguageKind


class CausalLM(LanguageKind):
    causal = True

    def features(self, featurizer, records, locations, rngs):
        return featurizer.text(records)

    def synthetic_labels(self, shape, dtype, ids, mask, rng, num_labels, mlm_probability):
        return np.where(mask == 1, ids, IGNORE).astype(dtype)

    def loss(self, cfg=None):
        return losses.causal_lm


KIND = CausalLM("causal_lm", "causal_lm", ("text",), "perplexity", "min", LANGUAGE_METRICS, pack="stream",
                kl_unit="causal", vocab_head=True)
