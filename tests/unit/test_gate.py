"""The promotion gate's rule: non-inferiority within a margin, failing closed."""

import numpy as np
import pytest

from core.settings import GateSpec
from flows.gate import decide

GOOD = {"auc": 0.8, "rmse": 0.26, "baseline_rmse": 0.38}


def _errors(n=2000, mean=0.07, seed=0):
    return np.random.default_rng(seed).exponential(mean, n)


def test_a_worse_challenger_whose_interval_straddles_zero_is_rejected():
    rng = np.random.default_rng(1)
    old = _errors(400)
    new = old + 0.045 + rng.normal(0, 0.65, len(old))  # +0.045 on average, very noisy
    d = decide(GateSpec(), GOOD, new, GOOD, old, "5")
    assert d.mse_diff["low"] < 0 < d.mse_diff["high"]  # the uncertain case
    assert not d.passed
    assert "not shown non-inferior to v5" in d.summary()


def test_a_retrain_as_good_up_to_noise_passes():
    rng = np.random.default_rng(2)
    old = _errors()
    new = np.clip(old + rng.normal(0.001, 0.01, len(old)), 0, None)
    d = decide(GateSpec(), GOOD, new, GOOD, old, "5")
    assert d.passed, d.summary()
    assert d.mse_diff["high"] < d.mse_diff["margin"] == pytest.approx(0.1 * old.mean())
    assert "non-inferior to v5" in d.summary() and "upper bound below the margin" in d.summary()


def test_a_clearly_better_challenger_passes_and_a_clearly_worse_one_does_not():
    old = _errors()
    assert decide(GateSpec(), GOOD, old * 0.8, GOOD, old, "1").passed
    assert not decide(GateSpec(), GOOD, old * 1.3, GOOD, old, "1").passed


@pytest.mark.parametrize(
    ("metrics", "new", "old", "why"),
    [
        (GOOD | {"rmse": float("nan")}, None, None, "non-finite challenger metrics: rmse=nan"),
        (GOOD | {"auc": float("nan")}, None, None, "non-finite challenger metrics: auc=nan"),
        (GOOD, np.full(500, np.nan), None, "500 non-finite per-row errors of the challenger"),
        (GOOD, None, np.r_[_errors(499), np.inf], "1 non-finite per-row errors of the champion"),
        (GOOD, None, _errors(400), "per-row errors do not pair up (500 vs 400 rows)"),
        (GOOD, _errors(150), None, "a holdout of 150 rows is too small to decide"),
    ],
)
def test_it_fails_closed_with_the_reason(metrics, new, old, why):
    new = _errors(500) if new is None else new
    old = _errors(len(new), seed=3) if old is None else old
    d = decide(GateSpec(), metrics, new, GOOD, old, "1")
    assert not d.passed and why in d.summary()
    if "champion" not in why and "pair up" not in why:  # the first model too
        first = decide(GateSpec(), metrics, new)
        assert not first.passed and why in first.summary()


def test_the_first_model_is_judged_on_floors_alone():
    d = decide(GateSpec(), GOOD, _errors(500))
    assert d.passed and "no champion: judged on floors alone" in d.summary()
    d = decide(GateSpec(), GOOD | {"auc": 0.55}, _errors(500))
    assert not d.passed and "AUC 0.550 below the floor" in d.summary()


def test_the_rule_is_stated_in_words_with_the_numbers():
    d = decide(GateSpec(margin=0.07), GOOD, _errors(500))
    assert "upper bound of the 95% CI" in d.rule and "below 7% of the champion's MSE" in d.rule
    assert d.to_dict()["rule"] == d.rule
    # the value criterion as each setting of value_check applies it
    assert "When both off-policy estimates are well conditioned" in d.rule
    assert "above −7% of the holdout rewards' standard deviation (its upper bound" in d.rule
    forced = decide(GateSpec(margin=0.07, value_check=True), GOOD, _errors(500)).rule
    assert "doubly-robust value must also lie above −7%" in forced and "upper bound," not in forced
    off = decide(GateSpec(value_check=False), GOOD, _errors(500)).rule
    assert "off-policy value is reported, not applied" in off and "doubly-robust" not in off
