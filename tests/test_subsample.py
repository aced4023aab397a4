"""data.subset and data.label_noise: exact counts, determinism by data.seed, flipped labels
always differ from the original, nested subsets, and the config fields' validation."""
import collections
import json
import pathlib

import pydantic
import pytest

from tenure.engine.data.config import DataConfig
from tenure.engine.data.subsample import describe, subsample_and_corrupt
from tenure.models.errors import TenureError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lexnames():
    lines = (ROOT / "data/wordnet_lexnames/train.jsonl").read_text().splitlines()
    records = [{**json.loads(line), "location": f"train.jsonl:{i + 1}"} for i, line in enumerate(lines)]
    labels = sorted({r["label"] for r in records})
    return records, labels


def cfg(**kwargs):
    return DataConfig(train="unused.jsonl", **kwargs)


def test_defaults_return_every_record_unchanged(lexnames):
    records, labels = lexnames
    out, report = subsample_and_corrupt(records, cfg(), "label", labels)
    assert out == records and out is not records
    assert report["kept"] == 8000 and report["flipped"] == 0 and report["subset"] is None
    assert describe(report) == "train data: all records, no label noise"


def test_subset_keeps_exactly_n_in_original_order_and_depends_on_the_seed(lexnames):
    records, labels = lexnames
    out, report = subsample_and_corrupt(records, cfg(subset=100, seed=3), "label", labels)
    assert len(out) == 100 and report["kept"] == 100 and report["records"] == 8000
    positions = [int(r["location"].split(":")[1]) for r in out]
    assert positions == sorted(positions) and len(set(positions)) == 100
    assert all(r == records[p - 1] for r, p in zip(out, positions))
    again, _ = subsample_and_corrupt(records, cfg(subset=100, seed=3), "label", labels)
    other, _ = subsample_and_corrupt(records, cfg(subset=100, seed=4), "label", labels)
    assert again == out
    assert len({r["location"] for r in other} & {r["location"] for r in out}) < 20  # ~100*100/8000 expected
    # Nested: the first N of one permutation, so subset 100 lies inside subset 1000.
    bigger, _ = subsample_and_corrupt(records, cfg(subset=1000, seed=3), "label", labels)
    assert {r["location"] for r in out} <= {r["location"] for r in bigger}
    whole, _ = subsample_and_corrupt(records, cfg(subset=8000, seed=3), "label", labels)
    assert whole == records
    assert describe(report) == "train data: kept 100 of 8000 records (data.subset, seeded)"


def test_label_noise_flips_the_exact_count_to_other_labels(lexnames):
    records, labels = lexnames
    out, report = subsample_and_corrupt(records, cfg(subset=1000, label_noise=0.2, seed=7), "label", labels)
    clean, _ = subsample_and_corrupt(records, cfg(subset=1000, seed=7), "label", labels)
    assert [r["location"] for r in out] == [r["location"] for r in clean]  # same examples as the clean twin
    changed = [(c["label"], o["label"]) for c, o in zip(clean, out) if c["label"] != o["label"]]
    assert report["flipped"] == 200 and len(changed) == 200
    assert all(new in labels and new != old for old, new in changed)
    assert all(o["text"] == c["text"] for o, c in zip(out, clean))
    # Not all flips land on one label: the new label is drawn among the 15 others.
    assert len({new for _, new in changed}) >= 10
    assert len(report["flipped_examples"]) == 5
    first = report["flipped_examples"][0]
    assert dict(zip(("from", "to"), changed[0])) == {"from": first["from"], "to": first["to"]}
    assert describe(report) == ("train data: kept 1000 of 8000 records (data.subset, seeded); "
                                "flipped 200 of 1000 labels (data.label_noise=0.2)")
    # The input is not modified.
    assert collections.Counter(r["label"] for r in clean) == collections.Counter(
        records[int(r["location"].split(":")[1]) - 1]["label"] for r in clean)


def test_label_noise_is_deterministic_by_seed_and_rounds_the_count(lexnames):
    records, labels = lexnames
    a, ra = subsample_and_corrupt(records, cfg(label_noise=0.1, seed=1), "label", labels)
    b, _ = subsample_and_corrupt(records, cfg(label_noise=0.1, seed=1), "label", labels)
    c, _ = subsample_and_corrupt(records, cfg(label_noise=0.1, seed=2), "label", labels)
    assert a == b and a != c and ra["flipped"] == 800
    flipped_a = {r["location"] for r, o in zip(a, records) if r["label"] != o["label"]}
    flipped_c = {r["location"] for r, o in zip(c, records) if r["label"] != o["label"]}
    assert len(flipped_a) == len(flipped_c) == 800 and flipped_a != flipped_c
    _, small = subsample_and_corrupt(records[:7], cfg(label_noise=0.25), "label", labels)
    assert small["flipped"] == 2  # round(1.75)


def test_two_labels_always_swap(lexnames):
    records = [{"text": f"t{i}", "label": i % 2} for i in range(50)]
    out, report = subsample_and_corrupt(records, cfg(label_noise=0.5, seed=0), "label", [0, 1])
    flipped = [(r["label"], o["label"]) for r, o in zip(records, out) if r["label"] != o["label"]]
    assert report["flipped"] == 25 and len(flipped) == 25
    assert all(new == 1 - old for old, new in flipped)


def test_errors_are_one_line_and_name_the_key(lexnames):
    records, labels = lexnames
    with pytest.raises(TenureError, match=r"data\.subset: 9000 is more than the 8000 training records"):
        subsample_and_corrupt(records, cfg(subset=9000), "label", labels)
    with pytest.raises(TenureError, match="no class labels to flip"):
        subsample_and_corrupt([{"text": "x"}], cfg(label_noise=0.5), None, None)
    with pytest.raises(TenureError, match="at least 2 labels"):
        subsample_and_corrupt(records, cfg(label_noise=0.5), "label", ["noun.plant"])
    with pytest.raises(TenureError, match=r"train.jsonl:1: field 'label' is 'nope', not in the label set"):
        subsample_and_corrupt([{"text": "x", "label": "nope", "location": "train.jsonl:1"}],
                              cfg(label_noise=0.9), "label", labels)
    with pytest.raises(TenureError, match=r"list \(token tags\)"):
        subsample_and_corrupt([{"tokens": ["a"], "tags": ["O"]}], cfg(label_noise=0.9), "tags", ["O", "B-X"])


@pytest.mark.parametrize("field, value, message", [
    ("subset", 0, "greater than or equal to 1"),
    ("label_noise", 1.0, "less than 1"),
    ("label_noise", -0.1, "greater than or equal to 0"),
])
def test_config_fields_validate(field, value, message):
    with pytest.raises(pydantic.ValidationError, match=message) as caught:
        cfg(**{field: value})
    assert caught.value.errors()[0]["loc"] == (field,)
    good = cfg(subset=100, label_noise=0.2)
    assert good.subset == 100 and good.label_noise == 0.2
    assert cfg().subset is None and cfg().label_noise == 0.0
    assert DataConfig.model_fields["subset"].description and DataConfig.model_fields["label_noise"].description
