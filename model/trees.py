"""A gradient-boosted tree reward model over flattened (context, action) pairs: one of
distillation's teachers (see `model.train`), never served.

Trees find by splits what the network learns slowly from few rows (a threshold on one
number, one flag that flips the best action), and err differently from the networks:
the mean of both scores decides better than either. The served network learns that
mean, so it keeps one network's serving cost."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from model.features import leaves

MAX_COLUMNS = 512  # the most frequent features of the training rows
MAX_INDICATOR_CHARS = 64  # longer strings are text, not a category
# more and smaller steps, smaller leaves and an L2 penalty than scikit-learn's defaults
# (100 rounds at 0.1, leaves of 20 rows): alone as direct-method policies on the hard
# world's ten 1k-row logs (bench/policy_bench.py's) these closed 0.309 of the gap, the
# defaults 0.221, LightGBM's 400 rounds at 0.05 0.280
BOOSTING = {
    "max_iter": 400,
    "learning_rate": 0.05,
    "min_samples_leaf": 10,
    "l2_regularization": 1.0,
}


def flat(bot: str, data_type: str, x, action) -> tuple[dict[str, float], set[str]]:
    """One pair as features: numbers as values, booleans and short strings as
    indicators (`path=value`), with the bot and the kind of data as indicators; and
    which of the features are numbers."""
    out = {f"bot={bot}": 1.0, f"dt={data_type}": 1.0}
    numbers = set()
    for prefix, doc in (("in", x), ("act", action)):
        for path, v in leaves(doc, prefix):
            if isinstance(v, bool) or (isinstance(v, str) and len(v) <= MAX_INDICATOR_CHARS):
                out[f"{path}={v}"] = 1.0
            elif isinstance(v, int | float) and _finite(v):
                out[path] = float(v)
                numbers.add(path)
    return out, numbers


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float range
        return False


class TreeTeacher:
    """scikit-learn's histogram gradient boosting on the flattened pairs. A number
    absent from a pair is missing (the trees learn where it goes); an indicator absent
    is 0."""

    def __init__(self, columns: list[str], numeric: set[str], model, threads: int, rows: int):
        self.rows = rows  # fitted to
        self.columns = {c: i for i, c in enumerate(columns)}
        self.numeric = np.array([c in numeric for c in columns])
        self.model = model
        self.threads = threads

    @classmethod
    def fit(
        cls,
        rows: list[tuple[str, str, object, object]],
        rewards: np.ndarray,
        weights: np.ndarray | None = None,
        seed: int = 0,
        threads: int = 1,
        max_columns: int = MAX_COLUMNS,
    ) -> TreeTeacher:
        flats = [flat(*r) for r in rows]
        feats = [f for f, _ in flats]
        counts = Counter(k for f in feats for k in f)
        columns = sorted(counts, key=lambda k: (-counts[k], k))[:max_columns]
        numeric = set().union(*(n for _, n in flats))
        model = HistGradientBoostingRegressor(random_state=seed, **BOOSTING)
        teacher = cls(columns, numeric, model, threads, len(rows))
        with threadpool_limits(threads):
            model.fit(teacher._matrix(feats), np.asarray(rewards), sample_weight=weights)
        return teacher

    def _matrix(self, feats: list[dict[str, float]]) -> np.ndarray:
        m = np.zeros((len(feats), len(self.columns)), dtype=np.float32)
        m[:, self.numeric] = np.nan
        for i, f in enumerate(feats):
            for k, v in f.items():
                j = self.columns.get(k)
                if j is not None:
                    m[i, j] = v
        return m

    def predict(
        self, rows: Iterable[tuple[str, str, object, object]], chunk: int = 8192
    ) -> np.ndarray:
        """The trees' score of each pair, `chunk` pairs at a time (the dense matrix of a
        large snapshot's pairs would not fit)."""
        rows = list(rows)
        out = [np.zeros(0, dtype=np.float32)]
        with threadpool_limits(self.threads):
            for i in range(0, len(rows), chunk):
                feats = [flat(*r)[0] for r in rows[i : i + chunk]]
                out.append(self.model.predict(self._matrix(feats)).astype(np.float32))
        return np.concatenate(out)
