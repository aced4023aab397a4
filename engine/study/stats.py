"""Confidence intervals over seeds and interpolation along a sweep (numpy only).

Every interval is a 95% percentile bootstrap over seeds: RESAMPLES draws of n seeds with
replacement from a generator seeded with RNG_SEED, so the same runs give the same interval.
A paired comparison resamples seeds, not runs: the method's and the reference's values of one
seed (same stage A, same data order) stay together.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
RNG_SEED = 0
LEVEL = 0.95


def resample_indices(n: int) -> np.ndarray:
    """[RESAMPLES, n] seed indices drawn with replacement (the same for every call with this n)."""
    return np.random.default_rng(RNG_SEED).integers(0, n, size=(RESAMPLES, n))


def percentile_interval(samples_B: np.ndarray) -> tuple[float, float]:
    """The central LEVEL interval of the finite bootstrap samples (NaN, NaN when none)."""
    finite = samples_B[np.isfinite(samples_B)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_ci(values_N: np.ndarray) -> tuple[float, float, float, int]:
    """(mean, CI low, CI high, n) of the finite values; no interval below 2 values."""
    finite = np.asarray(values_N, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if finite.size == 1:
        return float(finite[0]), float("nan"), float("nan"), 1
    lo, hi = percentile_interval(finite[resample_indices(finite.size)].mean(axis=1))
    return float(finite.mean()), lo, hi, int(finite.size)


def interpolate_rows(x_BxP: np.ndarray, y_BxP: np.ndarray, level_B: np.ndarray) -> np.ndarray:
    """Per row b: y at x = level_B[b], linear between the two points around it after sorting the
    row's points by x; NaN where the level lies outside the row's x range (not reached)."""
    order_BxP = np.argsort(x_BxP, axis=1, kind="stable")
    xs_BxP = np.take_along_axis(x_BxP, order_BxP, axis=1)
    ys_BxP = np.take_along_axis(y_BxP, order_BxP, axis=1)
    B, P = xs_BxP.shape
    level_B = np.asarray(level_B, dtype=np.float64)
    reached_B = (level_B >= xs_BxP[:, 0]) & (level_B <= xs_BxP[:, -1])
    if P == 1:
        return np.where(reached_B, ys_BxP[:, 0], np.nan)
    right_B = np.clip((xs_BxP <= level_B[:, None]).sum(axis=1), 1, P - 1)  # first point right of the level
    rows = np.arange(B)
    x0, x1 = xs_BxP[rows, right_B - 1], xs_BxP[rows, right_B]
    y0, y1 = ys_BxP[rows, right_B - 1], ys_BxP[rows, right_B]
    span = x1 - x0
    t = np.where(span > 0, (level_B - x0) / np.where(span > 0, span, 1.0), 0.0)
    return np.where(reached_B, y0 + t * (y1 - y0), np.nan)
