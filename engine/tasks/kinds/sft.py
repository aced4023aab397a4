"""sft: a causal LM on prompt + completion (or chat) whose prompt tokens carry no labels; with
`generation_examples`, prompt_completion data also reports BLEU / ROUGE of generated completions.
data.pack packs each batch's own examples into fewer rows (`batch_packing.pack_rows`): the same loss."""
from __future__ import annotations

from tenure.engine.tasks.kinds.base import LANGUAGE_METRICS
from tenure.engine.tasks.kinds.causal_lm import CausalLM


class Sft(CausalLM):
    def features(self, featurizer, records, locations, rngs):
        return featurizer.chat(records) if featurizer.fmt == "chat" else featurizer.prompt_completion(records)


KIND = Sft("sft", "causal_lm", ("prompt_completion", "chat"), "perplexity", "min", LANGUAGE_METRICS, pack="rows",
           kl_unit="causal", vocab_head=True, generation=True)
