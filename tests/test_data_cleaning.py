"""Cleaning: per-step counts on a crafted list, output values, determinism, config errors."""

import pydantic
import pytest

from tenure.engine.data.cleaning import CleaningConfig, clean, clean_whitespace, near_duplicate_key
from tenure.models.errors import TenureError


def _records(texts):
    return [{"text": t, "label": "a", "location": f"f:{i + 1}", "synthetic": False}
            for i, t in enumerate(texts)]


CRAFTED = [
    "Hello   world",        # 1 whitespace changed
    "Hello world",          # 2 exact duplicate of 1 after whitespace cleanup
    "hello, WORLD!",        # 3 near duplicate of 1
    "ﬁne caf\u0065\u0301",  # 4 unicode changed (NFKC ligature, combining accent)
    "hi",                   # 5 too short (< 3 chars)
    "x" * 40,               # 6 too long (> 30 chars)
    "fine café",            # 7 exact duplicate of 4 after NFKC
    "Something else",       # 8 kept
]


def test_each_step_counts_what_it_removed():
    cfg = CleaningConfig(unicode_form="NFKC", whitespace=True, drop_exact_duplicates=True,
                         drop_near_duplicates=True, min_length=3, max_length=30)
    kept, report = clean(_records(CRAFTED), cfg, ["text"])
    assert report.as_dict() == {"total": 8, "unicode_changed": 1, "whitespace_changed": 1,
                                "too_short": 1, "too_long": 1, "exact_duplicates": 2,
                                "near_duplicates": 1, "kept": 3}
    assert [(r["location"], r["text"]) for r in kept] == [
        ("f:1", "Hello world"), ("f:4", "fine café"), ("f:8", "Something else")]
    assert str(report) == ("cleaning: 8 records; normalised unicode in 1, whitespace in 1; removed "
                           "1 too short, 1 too long, 2 exact duplicates, 1 near duplicates; kept 3")


def test_defaults_only_apply_nfc_and_are_deterministic():
    kept, report = clean(_records(CRAFTED), CleaningConfig(), ["text"])
    assert report.kept == 8 and report.unicode_changed == 1  # only the combining accent
    assert [r["text"] for r in kept][3] == "ﬁne café"
    again, _ = clean(_records(CRAFTED), CleaningConfig(), ["text"])
    assert list(again) == list(kept)


def test_word_length_and_multi_field_records():
    records = [{"text_a": "one two", "text_b": "three", "location": "p:1"},
               {"text_a": "one", "text_b": "two", "location": "p:2"}]
    cfg = CleaningConfig(length_unit="words", min_length=3)
    kept, report = clean(records, cfg, ["text_a", "text_b"])
    assert [r["location"] for r in kept] == ["p:1"] and report.too_short == 1


def test_chat_and_token_fields():
    chat = [{"messages": [{"role": "user", "content": " a  b "}, {"role": "assistant", "content": "c\r\n"}]}]
    kept, report = clean(chat, CleaningConfig(whitespace=True), ["messages"])
    assert list(kept)[0]["messages"] == [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]
    tokens = [{"tokens": [" ﬁ", "x"], "tags": ["O", "O"]}]
    kept, _ = clean(tokens, CleaningConfig(unicode_form="NFKC", whitespace=True), ["tokens"])
    assert list(kept)[0]["tokens"] == [" fi", "x"]  # token boundaries untouched


def test_helpers():
    assert clean_whitespace("  a \t b\r\n\r\n\r\n\n c  \n d ") == "a b\n\nc\nd"
    assert near_duplicate_key("Hello, World! ¿Qué?") == "helloworldqué"


def test_empty_result_and_config_errors():
    with pytest.raises(TenureError, match="^train data d.jsonl: no records left after cleaning$"):
        clean(_records(["a"]), CleaningConfig(min_length=5), ["text"], path="d.jsonl")
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        CleaningConfig(dedup=True)
    with pytest.raises(pydantic.ValidationError, match="max_length 2 is below min_length 5"):
        CleaningConfig(min_length=5, max_length=2)
