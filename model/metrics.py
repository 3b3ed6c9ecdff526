"""Metrics: pure functions of arrays (unit-tested, no model or server needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rmse(pred: Sequence[float], target: Sequence[float]) -> float:
    """Root mean squared error."""
    d = np.asarray(pred, float) - np.asarray(target, float)
    return float(np.sqrt(np.mean(d * d)))


def mae(pred: Sequence[float], target: Sequence[float]) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(target, float))))


def roc_auc(score: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    NaN when only one class is present.
    """
    s = np.asarray(score, float)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average rank over each run of ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def replay_value(
    chosen: Sequence[str], logged: Sequence[str], reward: Sequence[float]
) -> tuple[float, int]:
    """Replay estimate of a policy's value on logged data: the mean logged reward over
    the rows where the policy chooses the logged action, and how many rows matched
    (NaN, 0 when none did). Unbiased when the logged actions were uniformly random."""
    c, a = np.asarray(chosen, object), np.asarray(logged, object)
    r = np.asarray(reward, float)
    match = c == a
    n = int(match.sum())
    return (float(r[match].mean()) if n else float("nan")), n


def bootstrap_ci(
    x: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `x` with a percentile bootstrap interval: (mean, low, high)."""
    x = np.asarray(x, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    lo, hi = np.quantile(x[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of a - b over paired samples with a percentile bootstrap interval:
    (mean difference, low, high)."""
    return bootstrap_ci(np.asarray(a, float) - np.asarray(b, float), n_boot, alpha, seed)
