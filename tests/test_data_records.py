"""Record parsing per format, one-line bad-record messages, label vocab, validate()."""

import json

import pytest

from tenure.engine.data.records import (BadRecord, LabelVocab, ensure_not_empty, over_length_error, parse_record,
                                        resolve_fields, validate)
from tenure.engine.data.sources import open_source
from tenure.models.errors import TenureError

META = {"location": "f.jsonl:3", "synthetic": False}


@pytest.mark.parametrize("fmt, raw, expected", [
    ("text_label", {"text": "good", "label": "pos", "extra": 1}, {"text": "good", "label": "pos"}),
    ("text_label", {"text": "good", "label": 3}, {"text": "good", "label": 3}),
    ("pair", {"text_a": "a", "text_b": "b", "label": "x"}, {"text_a": "a", "text_b": "b", "label": "x"}),
    ("pair", {"text_a": "a", "text_b": "b", "label": 0.75}, {"text_a": "a", "text_b": "b", "label": 0.75}),
    ("token_tags", {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
     {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}),
    ("text_target", {"text": "t", "target": 4}, {"text": "t", "target": 4.0}),
    ("text_target", {"text": "t", "target": "2.5"}, {"text": "t", "target": 2.5}),
    ("prompt_completion", {"prompt": "", "completion": "hi"}, {"prompt": "", "completion": "hi"}),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ("text", {"text": "lm"}, {"text": "lm"}),
    ("retrieval", {"query": "q", "positive": "p"}, {"query": "q", "positive": "p", "negatives": []}),
    ("retrieval", {"query": "q", "positive": "p", "negatives": ["n1", "n2"]},
     {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}),
])
def test_parse_each_format(fmt, raw, expected):
    assert parse_record("f.jsonl:3", raw, fmt) == {**expected, **META}


def test_user_field_names_map_to_canonical_keys():
    record = parse_record("f:1", {"sentence": "s", "y": "pos"}, "text_label", {"text": "sentence", "label": "y"})
    assert record == {"text": "s", "label": "pos", "location": "f:1", "synthetic": False}
    with pytest.raises(BadRecord, match="^f:1: field 'y': missing$"):
        parse_record("f:1", {"sentence": "s"}, "text_label", {"text": "sentence", "label": "y"})


@pytest.mark.parametrize("fmt, raw, message", [
    ("text_label", {"text": "t"}, "field 'label': missing"),
    ("text_label", {"text": "t", "label": None}, "field 'label': is null"),
    ("text_label", {"text": 5, "label": "a"}, "field 'text': expected a string, got integer"),
    ("text_label", {"text": "   ", "label": "a"}, "field 'text': is empty"),
    ("text_label", {"text": "t", "label": True}, "field 'label': expected a string, integer or number label, got boolean"),
    ("text_label", ["not", "a", "dict"], "expected a JSON object, got list"),
    ("token_tags", {"tokens": ["a", "b"], "tags": ["O"]}, "field 'tags': has 1 tags for 2 tokens in 'tokens'"),
    ("token_tags", {"tokens": ["a", 1], "tags": ["O", "O"]},
     "field 'tokens': expected a list of strings, got a list containing integer"),
    ("token_tags", {"tokens": "a b", "tags": ["O", "O"]}, "field 'tokens': expected a list of strings, got string"),
    ("text_target", {"text": "t", "target": "high"}, "field 'target': expected a number, got string 'high'"),
    ("text_target", {"text": "t", "target": float("nan")}, "field 'target': expected a finite number, got nan"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]},
     "field 'messages': message 0: role must be one of system, user, assistant, got 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]},
     "field 'messages': has no non-empty assistant message to learn from"),
    ("chat", {"messages": []},
     "field 'messages': expected a non-empty list of {role, content} messages, got an empty list"),
    ("prompt_completion", {"prompt": "p", "completion": ""}, "field 'completion': is empty"),
    ("retrieval", {"query": "q", "positive": "p", "negatives": ["", "n"]},
     "field 'negatives': contains an empty string"),
])
def test_bad_records_give_one_line_messages(fmt, raw, message):
    with pytest.raises(BadRecord) as error:
        parse_record("data/train.jsonl:17", raw, fmt)
    assert str(error.value) == f"data/train.jsonl:17: {message}"
    assert isinstance(error.value, TenureError) and "\n" not in str(error.value)


def test_bad_json_line_becomes_bad_record_at_parse_time(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "ok" "label": "a"}\n')
    ds = open_source(str(path))  # opening does not raise
    with pytest.raises(BadRecord) as error:
        validate(ds, "text_label")
    assert str(error.value) == f"{path}:2: invalid JSON: Expecting ',' delimiter at column 15"


def test_format_and_field_config_errors():
    with pytest.raises(TenureError, match="^data.format: unknown record format 'nope'"):
        resolve_fields("nope", None)
    with pytest.raises(TenureError,
                       match="^data.fields: 'txt' is not a field of format 'text'; expected some of text$"):
        resolve_fields("text", {"txt": "body"})


def test_over_length_and_empty_dataset_messages():
    assert str(over_length_error("a.jsonl:4", "text", 600, 512)) == \
        "a.jsonl:4: field 'text': 600 tokens, longer than max_length 512"
    with pytest.raises(TenureError, match="^eval data d/e.csv: no records left after cleaning$"):
        ensure_not_empty(0, "eval", "d/e.csv", "cleaning")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return open_source(str(path))


def test_validate_skip_counts_and_lists_first_five(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "good", "label": "a"}] + [{"text": ""} for _ in range(6)] + [{"text": "x", "label": "b"}]
    records, report = validate(_write_jsonl(path, rows), "text_label", on_bad_record="skip")
    assert [r["text"] for r in records] == ["good", "x"]
    assert [r["location"] for r in records] == [f"{path}:1", f"{path}:8"]
    assert (report.total, report.skipped) == (8, 6)
    assert report.first == [f"{path}:{line}: field 'text': is empty" for line in range(2, 7)]
    assert str(report) == (f"train: skipped 6 of 8 bad records (first: {path}:2: field 'text': is empty; "
                           + "; ".join(f"{path}:{n}: field 'text': is empty" for n in range(3, 7)) + ")")


def test_validate_error_mode_raises_first_bad_record(tmp_path):
    ds = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}, {"label": "y"}])
    with pytest.raises(BadRecord, match=f"^{tmp_path}/t.jsonl:2: field 'label': missing$"):
        validate(ds, "text_label")


def test_validate_all_bad_is_an_empty_dataset_error(tmp_path):
    ds = _write_jsonl(tmp_path / "t.jsonl", [{"text": ""}])
    with pytest.raises(TenureError, match="^validation data t.jsonl: no records left after validation$"):
        validate(ds, "text_label", on_bad_record="skip", split="validation", path="t.jsonl")


def test_validate_checks_eval_labels_against_vocab(tmp_path):
    ds = _write_jsonl(tmp_path / "eval.jsonl", [{"s": "a", "y": "pos"}, {"s": "b", "y": "meh"}])
    vocab = LabelVocab(["neg", "pos"])
    fields = {"text": "s", "label": "y"}
    with pytest.raises(BadRecord, match=f"^{tmp_path}/eval.jsonl:2: field 'y': unknown label 'meh' "
                                        r"\(known: 'neg', 'pos'\)$"):
        validate(ds, "text_label", fields, label_vocab=vocab)
    records, report = validate(ds, "text_label", fields, "skip", label_vocab=vocab)
    assert [r["label"] for r in records] == ["pos"] and report.skipped == 1


def test_label_vocab_sorted_round_trip_and_unknown():
    vocab = LabelVocab(["pos", "neg", "pos", "neutral"])
    assert vocab.labels == ("neg", "neutral", "pos")
    assert [vocab.encode(label, "f:1") for label in ("neg", "pos")] == [0, 2]
    assert vocab.decode(1) == "neutral"
    assert LabelVocab.from_json(vocab.to_json()) == vocab
    assert json.loads(vocab.to_json()) == {"labels": ["neg", "neutral", "pos"]}
    with pytest.raises(BadRecord,
                       match=r"^f:9: field 'label': unknown label 'bad' \(known: 'neg', 'neutral', 'pos'\)$"):
        vocab.encode("bad", "f:9")
    # CSV gives numeric labels as strings: they sort as numbers.
    assert LabelVocab(["10", "2", "1"]).labels == ("1", "2", "10")
    assert LabelVocab.from_json(LabelVocab([3, 1]).to_json()).labels == (1, 3)


def test_label_vocab_from_records_bio_tags():
    records = [{"tokens": ["a", "b"], "tags": ["B-PER", "O"], **META}, {"tokens": ["c"], "tags": ["I-PER"], **META}]
    vocab = LabelVocab.from_records(records, "token_tags")
    assert vocab.labels == ("B-PER", "I-PER", "O")
    with pytest.raises(BadRecord, match="^f:2: field 'tags': unknown label 'B-LOC'"):
        vocab.encode("B-LOC", "f:2", field="tags")
    with pytest.raises(TenureError, match="format 'text' has no labels"):
        LabelVocab.from_records([], "text")


def test_labels_mixing_numbers_and_strings_are_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": f"w{i}", "label": label} for i, label in enumerate([1, "1", 0, "0"] * 3)]
    records, _ = validate(_write_jsonl(path, rows), "text_label")
    with pytest.raises(TenureError) as error:
        LabelVocab.from_records(records, "text_label")
    assert str(error.value) == (f"{path}:1: label 1 is a number, but {path}:2 has the string label '1': labels mix "
                                "numbers and strings, which would be different classes; write every label as a "
                                "number or every label as a string")
    numbers = [{"text": "w", "label": label, **META} for label in (1, 0, 1)]
    assert LabelVocab.from_records(numbers, "text_label").labels == (0, 1)
