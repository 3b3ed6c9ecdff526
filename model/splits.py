"""Levels worth knowing: where the reward steps as a number crosses a value.

The quantile bins let the network put a step anywhere, but gradient descent spreads
a step over the neighbouring bins (their inputs are correlated, and training stops
early), so a rule such as "RSI below 30" is learned as a ramp from 29 to 32, and the
decisions near the level go wrong. A regression tree puts its split exactly halfway
between two training values. This module finds such splits for each numeric key path
of the context: the rows are grouped by what was done (bot and action), since a level
matters through the actions it favours, and a cut is scored by how much it explains
of every group's reward at once (each group with its own mean on either side), so a
level that several actions share is found from all their rows. Cuts are taken
greedily, strongest first, while they explain clearly more than noise would, up to
MAX_CUTS per path; the featurizer then tells the network which interval between its
path's cuts each number falls in, so a level is one step to learn, at its place.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MAX_CUTS = 8  # per key path
MIN_LEAF = 5  # a group counts towards a cut with this many rows on each side
# At a fixed place, noise alone explains about one unit of noise variance per group
# (give or take 1.4 x the root of the number of groups). A cut must explain MIN_GAIN
# more than that plus four such spreads: noise at its best place among thousands
# (1 to 16 groups, 60 to 20,000 rows each) stayed under it by a few units.
MIN_GAIN = 16.0


def _threshold(groups: int) -> float:
    return groups + 4.0 * groups**0.5 + MIN_GAIN


def _gains(v: np.ndarray, r: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Sum of squares explained by splitting rewards `r` (values `v` sorted) at each of
    `cuts`; 0 where a side would have fewer than MIN_LEAF rows."""
    n = len(v)
    k = np.searchsorted(v, cuts)  # rows below each cut
    s = np.concatenate([[0.0], np.cumsum(r)])
    left, total = s[k], s[-1]
    ok = (k >= MIN_LEAF) & (n - k >= MIN_LEAF)
    k = np.where(ok, k, 1)
    gain = left**2 / k + (total - left) ** 2 / np.maximum(n - k, 1) - total**2 / n
    return np.where(ok, gain, 0.0)


def _noise(r: np.ndarray) -> float:
    """The spread of rewards `r` (sorted by value) around a step function of the value:
    neighbours differ by the noise alone but at the few steps (Rice's estimator)."""
    return float(np.sqrt(np.mean(np.diff(r) ** 2) / 2)) if len(r) > 1 else 0.0


class _Path:
    """One path's groups, each (values sorted, rewards in units of their noise)."""

    def __init__(self, groups: Iterable[tuple[np.ndarray, np.ndarray]]):
        self.groups = []
        for v, r in groups:
            v, r = np.asarray(v, np.float64), np.asarray(r, np.float64)
            order = np.argsort(v, kind="stable")
            v, r = v[order], r[order]
            sd = _noise(r)
            if len(v) >= 2 * MIN_LEAF and sd > 0:
                self.groups.append((v, (r - r.mean()) / sd))
        self.values = np.unique(np.concatenate([v for v, _ in self.groups] or [[]]))

    def best(self, lo: float, hi: float) -> tuple[float, float] | None:
        """(cut, gain) of the best cut strictly between `lo` and `hi`, when it passes."""
        u = self.values[(self.values > lo) & (self.values < hi)]
        if len(u) < 2:
            return None
        cuts = (u[:-1] + u[1:]) / 2  # halfway between neighbouring values
        total, counted = np.zeros(len(cuts)), 0
        for v, r in self.groups:
            a, b = np.searchsorted(v, [lo, hi], side="right")
            if b - a >= 2 * MIN_LEAF:
                total += _gains(v[a:b], r[a:b], cuts)
                counted += 1
        i = int(np.argmax(total))
        if total[i] < _threshold(counted):
            return None
        return float(cuts[i]), float(total[i])


def path_cuts(groups: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """The cuts of one path, sorted, from its groups of (values, rewards)."""
    path = _Path(groups)
    cuts: list[float] = []
    found = {(-np.inf, np.inf): path.best(-np.inf, np.inf)}
    while len(cuts) < MAX_CUTS:
        open_ = {span: f for span, f in found.items() if f is not None}
        if not open_:
            break
        (lo, hi), (cut, _) = max(open_.items(), key=lambda kv: kv[1][1])
        cuts.append(cut)
        del found[(lo, hi)]
        found[(lo, cut)] = path.best(lo, cut)
        found[(cut, hi)] = path.best(cut, hi)
    return sorted(cuts)
