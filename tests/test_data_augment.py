"""Augmentation: seeded determinism, synthetic tags, WordNet parsing, synthetic imports."""

import json
import os

import numpy as np
import pytest

from tenure.engine.data.augment import AugmentConfig, augment, augment_text, load_synonyms, load_synthetic
from tenure.models.errors import TenureError

LICENCE = "  1 This software and database is being provided to you, the LICENSEE\n"


@pytest.fixture
def wordnet_dir(tmp_path):
    """A tiny WordNet in the real data.* line format."""
    lines = {
        "data.noun": "00000001 05 n 02 dog 0 domestic_dog 0 000 | a pet\n",
        "data.verb": "00000002 38 v 02 run 0 sprint 0 000 | go fast\n",
        "data.adj": "00000003 00 a 03 happy 0 glad(a) 0 felicitous 0 000 | pleased\n"
                    "00000004 00 s 01 lonely 0 000 | alone\n",
        "data.adv": "00000005 02 r 02 quickly 0 speedily 0 000 | fast\n",
    }
    for name, body in lines.items():
        (tmp_path / name).write_text(LICENCE + body)
    load_synonyms.cache_clear()
    return str(tmp_path)


def _records(texts):
    return [{"text": t, "label": "a", "location": f"f:{i + 1}", "synthetic": False}
            for i, t in enumerate(texts)]


def test_wordnet_parsing(wordnet_dir):
    assert load_synonyms(wordnet_dir) == {
        "dog": ("domestic dog",), "domestic dog": ("dog",), "run": ("sprint",), "sprint": ("run",),
        "happy": ("felicitous", "glad"), "glad": ("felicitous", "happy"),
        "felicitous": ("glad", "happy"), "quickly": ("speedily",), "speedily": ("quickly",)}


def test_synonym_replacement_keeps_case_and_punctuation(wordnet_dir):
    cfg = AugmentConfig(synonym_replacement=1.0, wordnet_dir=wordnet_dir)
    out = augment_text("Happy dog, the dog runs quickly.", "synonym_replacement", cfg,
                       np.random.default_rng(0))
    words = out.split()
    assert words[0] in ("Glad", "Felicitous") and words[1] == "domestic" and words[2] == "dog,"
    assert words[3:] == ["the", "domestic", "dog", "runs", "speedily."]


def test_swap_and_delete_values():
    cfg = AugmentConfig()
    swapped = augment_text("a b c d e", "random_swap", cfg, np.random.default_rng(1))
    assert sorted(swapped.split()) == ["a", "b", "c", "d", "e"] and swapped != "a b c d e"
    cfg = AugmentConfig(random_deletion=0.99)
    assert len(augment_text("a b c d e", "random_deletion", cfg, np.random.default_rng(2)).split()) == 1
    assert augment_text("solo", "random_deletion", cfg, np.random.default_rng(2)) == "solo"


def test_augment_deterministic_per_seed_and_tags_synthetic(wordnet_dir):
    records = _records(["the happy dog runs quickly home today", "a lonely dog sleeps in the sun"])
    cfg = AugmentConfig(copies=3, synonym_replacement=0.3, random_swap=0.3, random_deletion=0.3,
                        wordnet_dir=wordnet_dir)
    first = list(augment(records, cfg, seed=7))
    assert len(first) == 8
    assert first[:2] == records  # originals untouched, synthetic False
    assert [r["synthetic"] for r in first] == [False] * 2 + [True] * 6
    assert [r["location"] for r in first[2:]] == ["f:1#aug1", "f:2#aug1", "f:1#aug2", "f:2#aug2",
                                                  "f:1#aug3", "f:2#aug3"]
    assert all(r["label"] == "a" for r in first)
    assert list(augment(records, cfg, seed=7)) == first
    ds = augment(records, cfg, seed=7)
    assert ds[5] == first[5]  # random access gives the same copy as iteration
    other = [r["text"] for r in augment(records, cfg, seed=8)][2:]
    assert other != [r["text"] for r in first[2:]]


def test_copies_zero_is_identity():
    records = _records(["x y"])
    assert list(augment(records, AugmentConfig(), seed=0)) == records


def test_missing_wordnet_errors_only_for_synonyms(tmp_path):
    load_synonyms.cache_clear()
    missing = str(tmp_path / "nowordnet")
    with pytest.raises(TenureError, match=f"^data.augment.synonym_replacement: WordNet file "
                                          f"{missing}/data.noun not found"):
        augment(_records(["a b"]), AugmentConfig(copies=1, wordnet_dir=missing), seed=0)
    cfg = AugmentConfig(copies=1, synonym_replacement=0, wordnet_dir=missing)
    out = list(augment(_records(["a b c"]), cfg, seed=0))
    assert out[1]["synthetic"] is True and set(out[1]["text"].split()) <= {"a", "b", "c"}
    with pytest.raises(TenureError, match="every operation is set to 0"):
        augment(_records(["a"]), AugmentConfig(copies=1, synonym_replacement=0, random_swap=0,
                                               random_deletion=0), seed=0)


@pytest.mark.skipif(not os.path.isfile("/usr/share/wordnet/data.noun"), reason="wordnet-base not installed")
def test_real_wordnet_synonyms():
    load_synonyms.cache_clear()
    synonyms = load_synonyms("/usr/share/wordnet")
    assert "glad" in synonyms["happy"] and "automobile" in synonyms["car"]


def test_load_synthetic_tags_and_validates(tmp_path):
    path = tmp_path / "generated.jsonl"
    path.write_text(json.dumps({"text": "gen", "label": "b"}) + "\n" + json.dumps({"text": ""}) + "\n")
    records, report = load_synthetic(str(path), "text_label", on_bad_record="skip")
    assert list(records) == [{"text": "gen", "label": "b", "location": f"{path}:1", "synthetic": True}]
    assert report.skipped == 1 and report.split == "synthetic"
