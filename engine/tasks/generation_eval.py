"""BLEU/ROUGE for decoders: greedy completions (KV-cache decoding, tenure.models.generate) of a
split's prompts against references.

The same evaluator scores the base model zero-shot and few-shot (k training examples
in the prompt) at the start of a run, so every SFT result has its prompting baseline.
"""
from __future__ import annotations

import numpy as np

from tenure.engine.tasks import metrics
from tenure.engine.data.pipeline import load_records
from tenure.models.generate import greedy_generate


class GenerationEval:
    def __init__(self, spec, data, tokenizer, model, split: str, batch_size: int = 16):
        """`spec`: the task config (generation_examples, few_shot, max_new_tokens); `data` its data."""
        records, _ = load_records(data, getattr(data, split), "sft", split=split)
        count = min(spec.generation_examples, len(records))
        self.examples = [records[i] for i in range(count)]
        train_paths = next(iter(data.sources.values())).path
        train_records, _ = load_records(data, train_paths, "sft", split="train")
        shots = [train_records[i] for i in range(min(spec.few_shot, len(train_records)))]
        self.few_shot_prefix = "".join(r["prompt"] + r["completion"] + "\n\n" for r in shots)
        self.tokenizer, self.model = tokenizer, model
        self.max_new_tokens, self.batch_size = spec.max_new_tokens, batch_size
        self.max_prompt_length = data.max_length

    def _prompt_ids(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask [len(prompts), W]: W is the longest prompt of the whole call,
        so every chunk of one call has the same shape (padding does not change the result:
        positions come from the mask)."""
        encoded = [self.tokenizer(p)["input_ids"][-self.max_prompt_length:] for p in prompts]
        width = max(len(ids) for ids in encoded)
        ids_BxL = np.zeros((len(prompts), width), np.int32)
        mask_BxL = np.zeros((len(prompts), width), np.int32)
        for row, ids in enumerate(encoded):  # left padding: every row ends at the same column
            ids_BxL[row, width - len(ids):] = ids
            mask_BxL[row, width - len(ids):] = 1
        return ids_BxL, mask_BxL

    def __call__(self, params, with_examples: bool = False) -> dict[str, float]:
        prefix = self.few_shot_prefix if with_examples else ""
        ids_NxL, mask_NxL = self._prompt_ids([prefix + r["prompt"] for r in self.examples])
        hypotheses = []
        for start in range(0, len(self.examples), self.batch_size):
            ids_BxL, mask_BxL = ids_NxL[start:start + self.batch_size], mask_NxL[start:start + self.batch_size]
            real = len(ids_BxL)
            if real < self.batch_size:  # the last chunk is filled up with copies of its first row:
                fill = self.batch_size - real  # one shape, one compiled decoding loop per call
                ids_BxL = np.concatenate([ids_BxL, np.repeat(ids_BxL[:1], fill, 0)])
                mask_BxL = np.concatenate([mask_BxL, np.repeat(mask_BxL[:1], fill, 0)])
            new_BxN = greedy_generate(self.model, params, ids_BxL, mask_BxL, self.max_new_tokens,
                                      eos_id=self.tokenizer.eos_token_id)[:real]
            hypotheses += [t.split("\n")[0].strip() for t in
                           self.tokenizer.batch_decode(new_BxN, skip_special_tokens=True)]
        return metrics.generation_metrics(hypotheses, [r["completion"].strip() for r in self.examples])
