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
    """Per row b: y at x = level_B[b], linear between the nearest points at or below and at or
    above the level (the row's points taken in order of x; points with equal x count as one, at
    their mean y); NaN where the level lies outside the row's x range (not reached)."""
    level_Bx1 = np.asarray(level_B, dtype=np.float64)[:, None]
    left_B = np.where(x_BxP <= level_Bx1, x_BxP, -np.inf).max(axis=1)
    right_B = np.where(x_BxP >= level_Bx1, x_BxP, np.inf).min(axis=1)
    reached_B = np.isfinite(left_B) & np.isfinite(right_B)

    def mean_y_at(x_B):
        at_BxP = x_BxP == x_B[:, None]
        return (y_BxP * at_BxP).sum(axis=1) / np.maximum(at_BxP.sum(axis=1), 1)

    y_left_B, y_right_B = mean_y_at(left_B), mean_y_at(right_B)
    span_B = np.where(reached_B, right_B - left_B, 0.0)
    t_B = np.where(span_B > 0, (level_Bx1[:, 0] - left_B) / np.where(span_B > 0, span_B, 1.0), 0.0)
    return np.where(reached_B, y_left_B + t_B * (y_right_B - y_left_B), np.nan)
