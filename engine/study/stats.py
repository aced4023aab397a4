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


def dominated_rows(x_BxP: np.ndarray, y_BxP: np.ndarray, higher_learns_more: bool) -> np.ndarray:
    """[B, P] True where another point of the row learns at least as much (x) and forgets at most as
    much (y), better in one of the two: a setting no one would pick for this trade-off."""
    u_BxP = x_BxP if higher_learns_more else -x_BxP
    u_q, u_p = u_BxP[:, None, :], u_BxP[:, :, None]
    y_q, y_p = y_BxP[:, None, :], y_BxP[:, :, None]
    beats_BxPxQ = (u_q >= u_p) & (y_q <= y_p) & ((u_q > u_p) | (y_q < y_p))
    return beats_BxPxQ.any(axis=2)


def interpolate_rows(x_BxP: np.ndarray, y_BxP: np.ndarray, level_B: np.ndarray,
                     higher_learns_more: bool = True) -> np.ndarray:
    """Per row b: the least forgetting (y) with which the row's points learn (x) at least
    level_B[b], along its lower envelope: the points no other point beats on both axes, linear
    between the nearest envelope points either side of the level (of points at equal x, the one
    forgetting least). A level past the envelope's least-learning point takes that point's y:
    learning more costs no more there. NaN where the level lies outside the row's x range (not
    reached): no extrapolation."""
    sign = 1.0 if higher_learns_more else -1.0
    u_BxP, level_Bx1 = sign * x_BxP, sign * np.asarray(level_B, dtype=np.float64)[:, None]
    reached_B = (u_BxP.min(axis=1) <= level_Bx1[:, 0]) & (level_Bx1[:, 0] <= u_BxP.max(axis=1))
    u_BxP = np.where(dominated_rows(x_BxP, y_BxP, higher_learns_more), np.nan, u_BxP)
    left_B = np.where(u_BxP < level_Bx1, u_BxP, -np.inf).max(axis=1)
    right_B = np.where(u_BxP >= level_Bx1, u_BxP, np.inf).min(axis=1)

    def mean_y_at(u_B):
        at_BxP = u_BxP == u_B[:, None]
        return (y_BxP * at_BxP).sum(axis=1) / np.maximum(at_BxP.sum(axis=1), 1)

    y_left_B, y_right_B = mean_y_at(left_B), mean_y_at(right_B)
    has_left_B = np.isfinite(left_B) & reached_B
    span_B = np.where(has_left_B, right_B - left_B, 1.0)
    t_B = np.where(has_left_B, (level_Bx1[:, 0] - left_B) / span_B, 1.0)
    return np.where(reached_B, y_right_B + (1.0 - t_B) * (y_left_B - y_right_B) * has_left_B, np.nan)
