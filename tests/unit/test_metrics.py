import math

import numpy as np
import pytest

from model import metrics


def test_rmse_and_mae():
    assert metrics.rmse([1, 2, 3], [1, 2, 3]) == 0
    assert metrics.rmse([0, 0], [3, 4]) == pytest.approx(math.sqrt(12.5))
    assert metrics.mae([0, 0], [3, -4]) == pytest.approx(3.5)


def test_roc_auc_perfect_inverse_ties_and_degenerate():
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert metrics.roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # one positive ranked above two of three negatives
    assert metrics.roc_auc([0.3, 0.1, 0.2, 0.4], [1, 0, 0, 0]) == pytest.approx(2 / 3)
    assert math.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) > 0.4
    pos, neg = s[y], s[~y]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert metrics.roc_auc(s, y) == pytest.approx(np.mean(pairs))


def test_replay_value_counts_only_matching_rows():
    value, n = metrics.replay_value(
        ["a", "b", "a", "c"], ["a", "a", "a", "c"], [1.0, 5.0, 0.0, 2.0]
    )
    assert (value, n) == (1.0, 3)
    value, n = metrics.replay_value(["x"], ["y"], [1.0])
    assert math.isnan(value) and n == 0


def test_paired_bootstrap_ci_covers_the_difference_and_detects_shifts():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 500)
    mean, lo, hi = metrics.paired_bootstrap_ci(a + 0.5, a)
    assert mean == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    noise = rng.normal(0, 0.1, 500)
    mean, lo, hi = metrics.paired_bootstrap_ci(a + noise, a)
    assert lo < 0 < hi  # no real difference: the interval straddles zero
    mean, lo, hi = metrics.paired_bootstrap_ci(a + noise + 0.05, a)
    assert lo > 0
