"""The batch contract (tenure.engine.data.batch_spec) against what the featurizer and the collators
make: every record format's padded batch, a batch packed per batch, packed LM rows, and a
multi-task batch have exactly the fields, shapes and dtypes `batch_fields` lists."""
import numpy as np
import pytest

from tenure.engine.data.batch_packing import pack_batch
from tenure.engine.data.batch_spec import batch_fields, field_shapes
from tenure.engine.data.packing import collate, pack_examples
from tenure.engine.data.records import LabelVocab
from tenure.engine.data.tokenize import Featurizer
from tests.test_data_tokenize import bert_tokenizer, lm_tokenizer

ROWS, LENGTH = 4, 16
RECORDS = {
    "text_label": [{"text": "the cat sat", "label": "a"}, {"text": "a dog ran", "label": "b"}],
    "pair": [{"text_a": "the cat", "text_b": "sat on a mat", "label": "a"}, {"text_a": "dog", "text_b": "ran",
                                                                             "label": "b"}],
    "text_target": [{"text": "the cat sat", "target": 0.5}, {"text": "a dog", "target": -1.0}],
    "token_tags": [{"tokens": ["the", "cat"], "tags": ["O", "B"]}, {"tokens": ["dog"], "tags": ["B"]}],
    "text": [{"text": "the cat sat on a mat"}, {"text": "a dog ran"}],
    "prompt_completion": [{"prompt": "the cat", "completion": " sat"}, {"prompt": "a", "completion": " dog ran"}],
    "retrieval": [{"query": "the cat", "positive": "a cat sat"}, {"query": "dog", "positive": "a dog ran"}],
}
CASES = [("seq_cls", "text_label"), ("pair_cls", "pair"), ("regression", "text_target"),
         ("token_cls", "token_tags"), ("mlm", "text"), ("causal_lm", "text"), ("sft", "prompt_completion"),
         ("embedding", "retrieval")]


def _examples(kind: str, fmt: str, task_id: int | None = None) -> list[dict]:
    records = RECORDS[fmt]
    tokenizer = lm_tokenizer() if kind in ("causal_lm", "sft") else bert_tokenizer()
    vocab = LabelVocab(["a", "b"] if fmt != "token_tags" else ["O", "B"]) if fmt in (
        "text_label", "pair", "token_tags") else None
    rngs = [np.random.default_rng(i) for i in range(len(records))]
    examples = Featurizer(kind, fmt, tokenizer, vocab, max_length=LENGTH)(records, rngs)
    for example in examples if task_id is not None else ():
        example["task_id"] = np.asarray(task_id, np.int32)
    return examples


def _described(batch: dict) -> dict:
    return {k: (v.shape, v.dtype) for k, v in batch.items()}


@pytest.mark.parametrize("kind,fmt", CASES)
@pytest.mark.parametrize("multi", [False, True])
def test_a_padded_batch_has_the_contracts_fields(kind, fmt, multi):
    batch = collate(_examples(kind, fmt, 1 if multi else None), [LENGTH], rows=ROWS)
    passages = batch["passage_input_ids"].shape[1] if fmt == "retrieval" else 1
    expected = field_shapes(batch_fields(kind, fmt, multi=multi), examples=ROWS, length=LENGTH, passages=passages)
    assert _described(batch) == expected


def test_a_batch_packed_per_batch_has_the_contracts_fields():
    batch = pack_batch(_examples("pair_cls", "pair", task_id=0), row_length=LENGTH, slots=ROWS, real=2)
    rows = batch["input_ids"].shape[0]
    expected = field_shapes(batch_fields("pair_cls", "pair", packed=True, multi=True), examples=ROWS,
                            length=LENGTH, rows=rows)
    assert rows < ROWS and _described(batch) == expected


def test_packed_lm_rows_have_the_contracts_fields():
    rows = pack_examples(_examples("causal_lm", "text"), LENGTH)
    batch = collate(rows, [LENGTH], rows=ROWS)
    expected = field_shapes(batch_fields("causal_lm", "text", packed=True), examples=ROWS, length=LENGTH)
    assert _described(batch) == expected
