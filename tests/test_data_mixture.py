"""Weighted mixing of named sources (exact interleave, random within tolerance) and reservoir sampling."""
import json

import grain
import numpy as np
import pytest
from scipy import stats

from tenure.engine.data.mixture import MixIterDataset, ReservoirBuffer, examples_before, integer_ratio, interleave_pattern
from tenure.models.errors import TenureError


def repeated(values):
    return grain.MapDataset.source(list(values)).repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=0))


def take(it, n):
    return [next(it) for _ in range(n)]


def test_integer_ratio_and_pattern():
    assert integer_ratio({"new": 5, "replay": 1}) == {"new": 5, "replay": 1}
    assert integer_ratio({"a": 0.7, "b": 0.3}) == {"a": 7, "b": 3}
    assert integer_ratio({"a": 2, "b": 4}) == {"a": 1, "b": 2}
    assert interleave_pattern({"new": 5, "replay": 1}) == ["new", "new", "new", "replay", "new", "new"]
    with pytest.raises(TenureError, match=r"^data.train: mixture weights must be > 0, got \{'a': 1, 'b': 0\}$"):
        integer_ratio({"a": 1, "b": 0})
    # A weight finer than the interleave's 1/1000 needs random mixing, which takes it as it is.
    with pytest.raises(TenureError, match=r"round to 0 at the interleave's resolution of 1/1000; use data.mix_mode=random"):
        integer_ratio({"a": 1, "b": 0.0004})
    MixIterDataset({"a": grain.MapDataset.range(4).to_iter_dataset(), "b": grain.MapDataset.range(4).to_iter_dataset()},
                   {"a": 1, "b": 0.0004}, mode="random")


def test_interleave_every_window_is_exact_and_small_source_repeats():
    ds = MixIterDataset({"new": repeated(range(100)), "replay": repeated([1000, 1001, 1002])},
                        {"new": 5, "replay": 1}, mode="interleave")
    out = take(iter(ds), 600)
    for w in range(0, 600, 6):
        window = out[w:w + 6]
        assert sum(v >= 1000 for v in window) == 1 and sum(v < 1000 for v in window) == 5
    assert [v for v in out if v >= 1000] == [1000, 1001, 1002] * 33 + [1000]
    assert [v for v in out if v < 1000] == list(range(100)) * 5


def test_random_mix_ratio_within_tolerance():
    ds = MixIterDataset({"a": repeated(range(10)), "b": repeated(range(100, 103))},
                        {"a": 3, "b": 1}, mode="random", seed=3)
    out = np.asarray(take(iter(ds), 20000))
    share_a = float(np.mean(out < 100))
    # Binomial std of the share is sqrt(.75 * .25 / 20000) = 0.0031; 0.015 is about 5 std.
    assert abs(share_a - 0.75) < 0.015
    again = np.asarray(take(iter(ds), 200))
    np.testing.assert_array_equal(out[:200], again)  # deterministic for a seed


@pytest.mark.parametrize("mode", ["interleave", "random"])
def test_mix_state_resumes_exactly(mode):
    ds = MixIterDataset({"x": repeated(range(7)), "y": repeated(range(50, 55))}, {"x": 2, "y": 1}, mode=mode)
    it = iter(ds)
    take(it, 1030)  # past the first block of random draws
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 20)
    fresh = iter(ds)
    fresh.set_state(state)
    assert take(fresh, 20) == expected


def test_mix_rejects_mismatched_names():
    with pytest.raises(TenureError, match=r"^data.train: mixture sources \['a'\] and weights \['b'\] differ$"):
        MixIterDataset({"a": repeated([1])}, {"b": 1.0})


def test_reservoir_keeps_everything_until_full_and_resumes():
    buf = ReservoirBuffer(capacity=5, seed=1)
    buf.extend(range(3))
    assert buf.items == [0, 1, 2] and len(buf) == 3
    whole = ReservoirBuffer(capacity=5, seed=1)
    whole.extend(range(40))
    part = ReservoirBuffer(capacity=5, seed=1)
    part.extend(range(17))
    restored = ReservoirBuffer.from_json(part.to_json())
    restored.extend(range(17, 40))
    assert restored.items == whole.items and restored.seen == 40


def test_reservoir_sample_is_uniform():
    n, k, seeds = 12, 3, 2000
    counts = np.zeros(n)
    for seed in range(seeds):
        buf = ReservoirBuffer(capacity=k, seed=seed)
        buf.extend(range(n))
        counts[buf.items] += 1
    assert counts.sum() == k * seeds
    # Each item should be kept with probability k / n = 0.25, i.e. 500 times out of 2000.
    chi2 = stats.chisquare(counts, np.full(n, k * seeds / n))
    assert chi2.pvalue > 0.001, (chi2, counts)


@pytest.mark.parametrize("mode,weights", [("interleave", {"a": 1, "b": 2}), ("interleave", {"a": 5, "b": 1, "c": 1}),
                                          ("random", {"a": 1, "b": 3}), ("random", {"a": 0.3, "b": 0.2, "c": 0.5})])
def test_examples_before_the_first_source_ends(mode, weights):
    """A finite first source of n examples ends the mix; `examples_before` says when, without mixing."""
    for n in (1, 7, 1500):
        sources = {name: grain.MapDataset.range(n).to_iter_dataset() if name == "a" else repeated(range(3))
                   for name in weights}
        mixed = sum(1 for _ in MixIterDataset(sources, weights, mode=mode, seed=4))
        assert examples_before(weights, mode, seed=4, count=n) == mixed
