"""The bundled WordNet datasets in data/: splits, fields, leakage, label sets, quickstart baseline."""
import collections
import importlib.util
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
SPLITS = ("train", "validation", "test")
QUICKSTART_MAX_MAJORITY = 0.15  # stated in the brief and data/wordnet_lexnames/README.md

# dataset -> (fields with their types, the field(s) that must not repeat across train/test, label field)
DATASETS = {
    "wordnet_lexnames": ({"text": str, "label": str}, ("text",), "label"),
    "wordnet_pairs": ({"text_a": str, "text_b": str, "label": str}, ("text_a", "text_b"), "label"),
    "wordnet_ner": ({"tokens": list, "tags": list}, ("tokens",), None),
    "wordnet_regression": ({"text_a": str, "text_b": str, "target": float}, ("text_a", "text_b"), None),
    "wordnet_sft": ({"prompt": str, "completion": str}, ("prompt",), None),
    "wordnet_text": ({"text": str}, ("text",), None),
    "wordnet_retrieval": ({"query": str, "positive": str, "negatives": list}, ("query",), None),
}


def load(name: str, split: str) -> list[dict]:
    path = DATA / name / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_splits_parse_with_the_right_fields(name):
    fields, _, _ = DATASETS[name]
    assert (DATA / name / "README.md").is_file() and (DATA / name / "LICENSE").is_file()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (DATA / name / "LICENSE").read_text()
    for split in SPLITS:
        records = load(name, split)
        assert len(records) >= 200, f"{name}/{split} has only {len(records)} records"
        for record in records:
            assert set(record) == set(fields), f"{name}/{split}: fields {sorted(record)}"
            for field, kind in fields.items():
                assert isinstance(record[field], kind), f"{name}/{split}: {field}={record[field]!r}"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_no_exact_duplicates_between_train_and_test(name):
    _, key_fields, _ = DATASETS[name]

    def key(r):
        return tuple(json.dumps(r[f]) for f in key_fields)

    train = {key(r) for r in load(name, "train")}
    test = [key(r) for r in load(name, "test")]
    assert len(set(test)) == len(test)
    assert not train & set(test)


@pytest.mark.parametrize("name", ["wordnet_lexnames", "wordnet_pairs"])
def test_eval_label_sets_are_subsets_of_train(name):
    train_labels = {r["label"] for r in load(name, "train")}
    for split in ("validation", "test"):
        assert {r["label"] for r in load(name, split)} <= train_labels


def test_quickstart_majority_baseline_is_low():
    train = load("wordnet_lexnames", "train")
    counts = collections.Counter(r["label"] for r in train)
    assert len(counts) == 16
    assert max(counts.values()) / len(train) <= QUICKSTART_MAX_MAJORITY
    test = load("wordnet_lexnames", "test")
    test_counts = collections.Counter(r["label"] for r in test)
    assert max(test_counts.values()) / len(test) <= QUICKSTART_MAX_MAJORITY


def test_ner_tags_are_valid_bio_aligned_with_tokens():
    types = {"PER", "LOC", "FOOD", "ANIMAL"}
    for split in SPLITS:
        for record in load("wordnet_ner", split):
            assert len(record["tokens"]) == len(record["tags"])
            previous = "O"
            for tag in record["tags"]:
                if tag.startswith("I-"):  # an inside tag continues an entity of the same type
                    assert previous[2:] == tag[2:], record
                assert tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:] in types)
                previous = tag
    assert {"B-PER", "I-PER", "B-LOC", "B-FOOD", "B-ANIMAL"} <= {
        t for r in load("wordnet_ner", "train") for t in r["tags"]
    }


def test_regression_targets_are_spread_in_unit_interval():
    targets = [r["target"] for r in load("wordnet_regression", "train")]
    assert all(0.0 < t <= 1.0 for t in targets)
    assert min(targets) < 0.2 and max(targets) > 0.8


def test_retrieval_has_three_distinct_hard_negatives():
    for record in load("wordnet_retrieval", "train"):
        assert len(record["negatives"]) == 3 and len(set(record["negatives"])) == 3
        assert record["positive"] not in record["negatives"]


def test_total_size_is_small():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 8 * 1024 * 1024


def load_builder():
    path = DATA.parent / "scripts" / "build_wordnet_data.py"
    spec = importlib.util.spec_from_file_location("build_wordnet_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builder_parses_a_data_line_and_scores_wu_palmer(tmp_path):
    builder = load_builder()
    lines = [
        "  1 licence header line",
        "00001740 03 n 01 entity 0 001 ~ 00000100 n 0000 | that which exists  ",
        "00000100 05 n 02 big_cat 0 feline 0 002 @ 00001740 n 0000 ~ 00000200 n 0000 | a cat; \"a big one\"  ",
        "00000200 05 n 01 lion 0 001 @ 00000100 n 0000 | large cat; \"roar\"; \"king\"  ",
    ]
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n", encoding="latin-1")
    synsets = {s.key: s for s in builder.parse_data_file(tmp_path / "data.noun", "n")}
    cat = synsets[("n", 100)]
    assert cat.lemmas == ["big cat", "feline"] and cat.lexname == "noun.animal"
    assert cat.hypernyms == [("n", 1740)] and cat.hyponyms == [("n", 200)]
    assert cat.definition == "a cat" and synsets[("n", 200)].definition == "large cat"
    depth = {k: d + 1 for k, d in builder.breadth_first(synsets, ("n", 1740), "hyponyms").items()}
    assert depth == {("n", 1740): 1, ("n", 100): 2, ("n", 200): 3}
    # lion vs big cat: lcs = big cat (d=2), distances 1 and 0 -> 2*2 / (2*2 + 1 + 0)
    assert builder.wu_palmer(synsets, ("n", 200), ("n", 100), depth) == pytest.approx(4 / 5)
