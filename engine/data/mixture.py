"""Named weighted mixing of example streams (replay), and a reservoir sample for replay buffers.

Two modes, both deterministic given the seed and resumable from `get_state()`:
  interleave: the weights are turned into the smallest integer ratio (e.g. {new: 5, replay: 1},
      or 0.7/0.3 -> 7/3) and a fixed pattern of period sum(ratio) is repeated; every aligned
      window of one period holds exactly ratio[name] examples of each source, spread out
      by smooth weighted round robin (5:1 gives the period new new new replay new new).
  random: example k comes from source s with probability weight_s / sum(weights); the
      uniform draws come in blocks of 1024 from an rng seeded by (seed, k // 1024).
Sources are expected to repeat (the pipeline repeats each one), so a small replay set cycles
under a big new set; the mix ends when any source ends (only a finite primary source can).
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any, Mapping

import grain
import numpy as np

from tenure.models.errors import TenureError

MAX_PERIOD = 10_000
DRAW_BLOCK = 1024


def check_weights(weights: Mapping[str, float]) -> None:
    if any(not w > 0 for w in weights.values()):
        raise TenureError(f"data.train: mixture weights must be > 0, got {dict(weights)}")


def integer_ratio(weights: Mapping[str, float]) -> dict[str, int]:
    """The smallest integer ratio equal to the weights (each rounded to 1/1000)."""
    check_weights(weights)
    fracs = {k: Fraction(w).limit_denominator(1000) for k, w in weights.items()}
    if any(f <= 0 for f in fracs.values()):
        raise TenureError(f"data.train: mixture weights {dict(weights)} round to 0 at the interleave's resolution "
                          "of 1/1000; use data.mix_mode=random")
    scale = math.lcm(*(f.denominator for f in fracs.values()))
    ints = {k: int(f * scale) for k, f in fracs.items()}
    common = math.gcd(*ints.values())
    ratio = {k: v // common for k, v in ints.items()}
    if sum(ratio.values()) > MAX_PERIOD:
        raise TenureError(f"data.train: mixture weights {dict(weights)} need an interleave period above "
                          f"{MAX_PERIOD}; use simpler ratios or data.mix_mode=random")
    return ratio


def interleave_pattern(weights: Mapping[str, float]) -> list[str]:
    """One period of source names, each name appearing ratio[name] times, evenly spread."""
    ratio = integer_ratio(weights)
    total = sum(ratio.values())
    credit = {k: 0 for k in ratio}
    pattern = []
    for _ in range(total):
        for k in ratio:
            credit[k] += ratio[k]
        pick = max(ratio, key=lambda k: credit[k])  # ties go to the first-named source
        credit[pick] -= total
        pattern.append(pick)
    return pattern


def _cumulative(weights: Mapping[str, float]) -> np.ndarray:
    total = sum(weights.values())
    return np.cumsum([w / total for w in weights.values()])


def _random_block(cumulative: np.ndarray, seed: int, block: int) -> np.ndarray:
    """The source indices (in the weights' order) of random-mode examples block*DRAW_BLOCK onward."""
    draws = np.random.default_rng([seed, block]).random(DRAW_BLOCK)
    return np.minimum(np.searchsorted(cumulative, draws, side="right"), len(cumulative) - 1)


def examples_before(weights: Mapping[str, float], mode: str, seed: int, count: int) -> int:
    """How many examples the mix yields before it asks its first source (the first of `weights`)
    for example `count + 1`: where a first source of `count` examples ends the mix."""
    if mode == "interleave":
        pattern = interleave_pattern(weights)
        first = next(iter(weights))
        at = [i for i, name in enumerate(pattern) if name == first]
        periods, within = divmod(count, len(at))
        return periods * len(pattern) + at[within]
    cumulative, seen, block = _cumulative(weights), 0, 0
    while True:
        firsts = np.flatnonzero(_random_block(cumulative, seed, block) == 0)
        if seen + len(firsts) > count:
            return block * DRAW_BLOCK + int(firsts[count - seen])
        seen, block = seen + len(firsts), block + 1


class _MixIterator(grain.DatasetIterator):
    def __init__(self, parents: dict[str, grain.DatasetIterator], weights: dict[str, float], mode: str, seed: int):
        super().__init__(list(parents.values()))
        self._sources = parents
        self._names = list(parents)
        self._mode, self._seed, self._step = mode, seed, 0
        self._pattern = interleave_pattern(weights) if mode == "interleave" else None
        self._cumulative = _cumulative({k: weights[k] for k in self._names})
        self._block, self._picks = -1, np.empty(0, np.int64)

    def _pick(self, step: int) -> str:
        if self._pattern is not None:
            return self._pattern[step % len(self._pattern)]
        block, offset = divmod(step, DRAW_BLOCK)
        if block != self._block:
            self._block, self._picks = block, _random_block(self._cumulative, self._seed, block)
        return self._names[int(self._picks[offset])]

    def __next__(self) -> Any:
        name = self._pick(self._step)
        element = next(self._sources[name])
        self._step += 1
        return element

    def get_state(self) -> dict:
        return {"step": self._step, "sources": {k: it.get_state() for k, it in self._sources.items()}}

    def set_state(self, state: dict) -> None:
        self._step = state["step"]
        for k, it in self._sources.items():
            it.set_state(state["sources"][k])


class MixIterDataset(grain.IterDataset):
    """Mixes named IterDatasets by weight (`mode` "interleave" or "random", see module doc)."""

    def __init__(self, sources: Mapping[str, grain.IterDataset], weights: Mapping[str, float], *,
                 mode: str = "interleave", seed: int = 0):
        if set(sources) != set(weights):
            raise TenureError(f"data.train: mixture sources {sorted(sources)} and weights {sorted(weights)} differ")
        if mode not in ("interleave", "random"):
            raise TenureError(f"data.mix_mode: expected 'interleave' or 'random', got {mode!r}")
        # Checked early; random mode draws by the weights as they are, interleave needs their period.
        if mode == "interleave":
            integer_ratio(weights)
        else:
            check_weights(weights)
        super().__init__(list(sources.values()))
        self._named = dict(sources)
        self._weights, self._mode, self._seed = dict(weights), mode, seed

    def __iter__(self) -> _MixIterator:
        return _MixIterator({k: ds.__iter__() for k, ds in self._named.items()},
                            self._weights, self._mode, self._seed)

    def __str__(self) -> str:
        return f"MixIterDataset(mode={self._mode}, weights={self._weights})"


class ReservoirBuffer:
    """A uniform random sample of up to `capacity` items from a stream (Vitter's algorithm R).

    Item i (0-based) is kept when j = randint(0, i) < capacity, replacing slot j; j is drawn
    from an rng seeded by (seed, i), so the buffer is a pure function of (seed, stream) and
    its state is just the items and the count. Items must be JSON-serialisable to checkpoint.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity <= 0:
            raise TenureError(f"replay buffer capacity must be > 0, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self.seen = 0
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        i = self.seen
        self.seen += 1
        if i < self.capacity:
            self.items.append(item)
            return
        j = int(np.random.default_rng([self.seed, i]).integers(0, i + 1))
        if j < self.capacity:
            self.items[j] = item

    def extend(self, items) -> None:
        for item in items:
            self.add(item)

    def __len__(self) -> int:
        return len(self.items)

    def to_json(self) -> str:
        return json.dumps({"capacity": self.capacity, "seed": self.seed, "seen": self.seen, "items": self.items})

    @classmethod
    def from_json(cls, text: str) -> "ReservoirBuffer":
        state = json.loads(text)
        buf = cls(state["capacity"], state["seed"])
        buf.seen, buf.items = state["seen"], state["items"]
        return buf
