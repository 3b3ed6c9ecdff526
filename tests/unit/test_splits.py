"""Levels where the reward steps, found as a regression tree finds its splits."""

import numpy as np
import pytest

from model import splits


def _step(values, level, below, above, noise, seed=0):
    rng = np.random.default_rng(seed)
    return np.where(values < level, below, above) + rng.normal(0, noise, len(values))


def test_a_level_is_cut_halfway_between_the_two_values_around_it():
    v = np.round(np.linspace(10, 90, 801), 1)  # rsi to one decimal, 0.1 apart
    assert splits.path_cuts([(v, _step(v, 30.0, 0.8, 0.0, 0.25))]) == [pytest.approx(29.95)]


def test_a_rule_with_a_level_on_each_side_gives_both_levels():
    rng = np.random.default_rng(1)
    v = np.round(rng.uniform(10, 90, 2000), 1)
    r = np.where(v < 30, 0.8, np.where(v > 70, -0.8, 0.0)) + rng.normal(0, 0.25, len(v))
    lo, hi = splits.path_cuts([(v, r)])
    assert lo == pytest.approx(30, abs=0.3) and hi == pytest.approx(70, abs=0.3)


@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("rows", [60, 1000, 20_000])
def test_noise_alone_gives_no_level(groups, rows):
    rng = np.random.default_rng(groups * rows)
    data = [(rng.uniform(0, 1, rows), rng.normal(0, 0.5, rows)) for _ in range(groups)]
    assert splits.path_cuts(data) == []


def test_a_level_too_weak_in_each_group_alone_is_found_from_the_groups_together():
    """Sixteen actions each see the level in 60 rows, a step of 0.7 noise spreads: alone,
    hardly any finds it; together they place it."""
    rng = np.random.default_rng(2)
    groups = []
    for seed in range(16):
        v = rng.uniform(10, 90, 60)
        groups.append((v, _step(v, 30.0, 0.0, 0.35, 0.5, seed=seed)))
    alone = [any(abs(c - 30) < 3 for c in splits.path_cuts([g])) for g in groups]
    assert sum(alone) <= 2
    (cut,) = splits.path_cuts(groups)
    assert cut == pytest.approx(30, abs=1.5)


def test_equal_values_and_groups_too_small_give_no_level():
    assert splits.path_cuts([(np.ones(100), np.arange(100.0))]) == []
    v = np.arange(9.0)  # fewer than MIN_LEAF rows on each side of any cut
    assert splits.path_cuts([(v, (v > 4) * 10.0)]) == []
    assert splits.path_cuts([]) == []


def test_a_path_keeps_its_strongest_levels_sorted_and_at_most_max_cuts():
    rng = np.random.default_rng(3)
    v = rng.uniform(0, 100, 3000)
    # two groups share the level 50 (one cut); a third has 20
    groups = [
        (v, _step(v, 50.0, 1.0, 0.0, 0.3, seed=4)),
        (v, _step(v, 50.0, 0.0, 0.6, 0.3, seed=5)),
        (v, _step(v, 20.0, 0.5, 0.0, 0.3, seed=6)),
    ]
    lo, hi = splits.path_cuts(groups)
    assert lo == pytest.approx(20, abs=1) and hi == pytest.approx(50, abs=1)
    stairs = [(v, np.floor(v / 8) + rng.normal(0, 0.1, len(v)))]  # a step every 8
    cuts = splits.path_cuts(stairs)
    assert len(cuts) == splits.MAX_CUTS and cuts == sorted(cuts)
