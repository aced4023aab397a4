"""mlm: BERT masking of non-special tokens (per-example rng); labels on the masked positions only."""
from __future__ import annotations

import numpy as np

from tenure.engine.data.batch_spec import IGNORE
from tenure.engine.tasks import losses
from tenure.engine.tasks.kinds.base import LANGUAGE_METRICS, LanguageKind


class MLM(LanguageKind):
    def check_tokenizer(self, tokenizer):
        return "task 'mlm': the tokenizer has no mask token" if tokenizer.mask_token_id is None else None

    def features(self, featurizer, records, locations, rngs):
        if rngs is None or len(rngs) != len(records):
            raise ValueError("mlm featurisation needs one rng per record")
        return featurizer.masked_text(records, rngs)

    def synthetic_labels(self, shape, dtype, ids, mask, rng, num_labels, mlm_probability):
        chosen = (rng.random(shape) < mlm_probability) & (mask == 1)
        return np.where(chosen, ids, IGNORE).astype(dtype)

    def loss(self, cfg=None):
        return losses.token_ce


KIND = MLM("mlm", "mlm", ("text",), "perplexity", "min", LANGUAGE_METRICS, kl_unit="token", random_features=True,
           vocab_head=True)
