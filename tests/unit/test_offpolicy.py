"""Off-policy value estimates: the estimators, the behaviour model, the gate's use."""

import numpy as np
import pytest

from core.settings import GateSpec
from flows.gate import decide, value_evidence
from model.offpolicy import Behaviour, PolicyRows, estimates

ACTIONS = [{"action": "buy"}, {"action": "sell"}, {"action": "hold"}]
GOOD = {"auc": 0.8, "rmse": 0.26, "baseline_rmse": 0.38}


def _true_reward(rsi: float, k: int) -> float:
    # buy pays below 30, sell above 70, hold a little everywhere
    return [0.6 if rsi < 30 else -0.3, 0.6 if rsi > 70 else -0.3, 0.1][k]


def _behaviour_probs(rsi: float) -> np.ndarray:
    # a habit of holding, with skill where the levels are crossed
    if rsi < 30:
        return np.array([0.5, 0.1, 0.4])
    if rsi > 70:
        return np.array([0.1, 0.5, 0.4])
    return np.array([0.15, 0.15, 0.7])


def _logs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    rsi = rng.uniform(0, 100, n)
    probs = np.array([_behaviour_probs(r) for r in rsi])
    logged = np.array([rng.choice(3, p=p) for p in probs])
    reward = np.array([_true_reward(r, k) for r, k in zip(rsi, logged, strict=True)])
    reward = reward + rng.normal(0, 0.25, n)
    inputs = [{"indicators": {"rsi": float(r)}, "task": "trade"} for r in rsi]
    return rsi, inputs, logged, reward, probs[np.arange(n), logged]


def _oracle(rsi):
    return np.array([int(np.argmax([_true_reward(r, k) for k in range(3)])) for r in rsi])


def _rows(rsi, logged, reward, propensity, chosen, q_bias=0.0):
    """Pieces for policy `chosen` with a reward model that is off by `q_bias`."""
    q = np.array([[_true_reward(r, k) + q_bias for k in range(3)] for r in rsi])
    n = len(rsi)
    return PolicyRows.build(
        q[np.arange(n), chosen],
        q[np.arange(n), logged],
        [ACTIONS[k] for k in chosen],
        [ACTIONS[k] for k in logged],
        propensity,
        reward,
    )


def test_snips_and_doubly_robust_find_the_true_value_that_a_biased_direct_method_misses():
    rsi, _, logged, reward, p = _logs(4000, seed=1)
    chosen = _oracle(rsi)
    truth = np.mean([_true_reward(r, k) for r, k in zip(rsi, chosen, strict=True)])
    est = estimates(_rows(rsi, logged, reward, p, chosen, q_bias=0.2))
    assert est["snips_ci"][0] < truth < est["snips_ci"][1]
    assert est["dr_ci"][0] < truth < est["dr_ci"][1]
    assert est["dm"] == pytest.approx(truth + 0.2)  # the reward model's bias, untouched
    assert not est["dm_ci"][0] < truth < est["dm_ci"][1]
    assert est["trusted"] and est["warning"] is None and 500 < est["ess"] < 4000


def test_the_behaviour_model_learns_propensities_that_hinge_on_a_level():
    _, inputs, logged, _, _ = _logs(3000, seed=2)
    behaviour = Behaviour(["bot"] * 3000, inputs, [ACTIONS[k] for k in logged])
    _, t_inputs, t_logged, _, t_p = _logs(1000, seed=3)
    est, clipped = behaviour.propensity(["bot"] * 1000, t_inputs, [ACTIONS[k] for k in t_logged])
    assert clipped == 0
    assert np.mean(np.abs(est - t_p)) < 0.06
    # calibrated: on average the estimate matches what the behaviour really did
    assert np.mean(est) == pytest.approx(np.mean(t_p), abs=0.03)


def test_a_logged_propensity_is_used_as_it_is_and_ignored_as_an_action_difference():
    _, inputs, logged, _, _ = _logs(300, seed=4)
    behaviour = Behaviour(["bot"] * 300, inputs, [ACTIONS[k] for k in logged])
    tagged = [ACTIONS[0] | {"propensity": 0.25}, ACTIONS[1]]
    est, _ = behaviour.propensity(["bot", "bot"], inputs[:2], tagged)
    assert est[0] == 0.25 and est[1] != 0.25
    rows = PolicyRows.build([0.1, 0.1], [0.1, 0.1], [ACTIONS[0]] * 2, tagged, est, [1.0, 0.0])
    assert rows.weight[0] == pytest.approx(4.0) and rows.weight[1] == 0  # buy matches buy


def test_poor_conditioning_is_said_in_words():
    rsi, _, logged, reward, p = _logs(2000, seed=5)
    rare = np.where(rsi < 30, 1, 0)  # sells when the behaviour almost never does
    est = estimates(_rows(rsi, logged, reward, p, rare), min_ess=500)
    assert not est["trusted"] and "effective sample size" in est["warning"]
    never = estimates(_rows(rsi, logged, reward, np.ones(2000), np.full(2000, 1)))
    never_rows = _rows(rsi, np.zeros(2000, int), reward, np.ones(2000), np.full(2000, 1))
    assert estimates(never_rows)["matched"] == 0
    assert "never chooses the logged action" in estimates(never_rows)["warning"]
    assert never["matched"] > 0


def _value(spec, new_choice, old_choice, seed=6):
    rsi, _, logged, reward, p = _logs(3000, seed=seed)
    new = _rows(rsi, logged, reward, p, new_choice(rsi))
    old = _rows(rsi, logged, reward, p, old_choice(rsi))
    return value_evidence(spec, new, old, reward)


def test_the_gate_rejects_a_challenger_that_loses_value_even_when_its_error_passes():
    errors = np.random.default_rng(0).exponential(0.07, 3000)
    spec = GateSpec()
    worse = _value(spec, lambda r: np.full(len(r), 2), _oracle)  # always hold
    assert worse["checked"] and worse["diff"]["high"] < 0
    d = decide(spec, GOOD, errors, GOOD, errors, "3", worse)
    assert not d.passed and "loses value" in d.summary()
    same = _value(spec, _oracle, _oracle)
    d = decide(spec, GOOD, errors, GOOD, errors, "3", same)
    assert d.passed and "doubly-robust value +0.0000" in d.summary()


def test_a_poorly_conditioned_estimate_is_reported_but_not_applied_unless_asked():
    errors = np.random.default_rng(0).exponential(0.07, 3000)
    spec = GateSpec(ope_min_ess=5000)  # no holdout of 3,000 rows reaches it
    auto = _value(spec, lambda r: np.full(len(r), 2), _oracle)
    assert not auto["checked"] and "not applied" in auto["note"]
    assert decide(spec, GOOD, errors, GOOD, errors, "3", auto).passed
    forced = spec.model_copy(update={"value_check": True})
    strict = _value(forced, lambda r: np.full(len(r), 2), _oracle)
    assert strict["checked"]
    assert not decide(forced, GOOD, errors, GOOD, errors, "3", strict).passed
    off = spec.model_copy(update={"value_check": False, "ope_min_ess": 10})
    assert not _value(off, lambda r: np.full(len(r), 2), _oracle)["checked"]


def _equal_value_pair(n: int, seed: int = 5):
    """A champion that always takes the habitual action and a challenger that takes a
    rarely logged one on 30% of the rows; every action is worth the same, so only the
    weights' noise separates them."""
    rng = np.random.default_rng(seed)
    logged = rng.choice(3, n, p=[0.8, 0.1, 0.1])
    propensity = np.array([0.8, 0.1, 0.1])[logged]
    reward = rng.normal(0.0, 1.0, n)
    new = np.where(rng.random(n) < 0.3, 1, 0)

    def rows(chosen):
        q = np.zeros(n)
        picked = [ACTIONS[k] for k in chosen]
        return PolicyRows.build(q, q, picked, [ACTIONS[k] for k in logged], propensity, reward)

    return rows(new), rows(np.zeros(n, int)), reward


def test_an_interval_wider_than_the_margin_rejects_only_a_loss_it_shows():
    errors = np.random.default_rng(0).exponential(0.07, 800)
    spec = GateSpec()
    value = value_evidence(spec, *_equal_value_pair(800))
    d = value["diff"]
    # well conditioned, but the interval cannot tell an equal challenger from a worse
    # one: its lower bound lies below the margin
    assert value["checked"] and (d["high"] - d["low"]) / 2 > d["margin"]
    assert d["low"] < -d["margin"] < d["high"]
    assert value["test"] == "no shown loss" and "exactly as good would fail" in value["note"]
    assert decide(spec, GOOD, errors, GOOD, errors, "3", value).passed
    forced = spec.model_copy(update={"value_check": True})
    strict = value_evidence(forced, *_equal_value_pair(800))
    assert strict["test"] == "non-inferiority"
    assert "loses value" in decide(forced, GOOD, errors, GOOD, errors, "3", strict).summary()
    # the same pair with ten times the rows: precise enough for non-inferiority, shown
    precise = value_evidence(spec, *_equal_value_pair(8000))
    assert precise["test"] == "non-inferiority" and "exactly as good" not in precise["note"]
    errors = np.random.default_rng(0).exponential(0.07, 8000)
    assert decide(spec, GOOD, errors, GOOD, errors, "3", precise).passed
    # and a clear loss is rejected however wide the interval
    rsi, _, logged, reward, p = _logs(300, seed=0)
    hold = value_evidence(
        spec,
        _rows(rsi, logged, reward, p, np.full(300, 2)),
        _rows(rsi, logged, reward, p, _oracle(rsi)),
        reward,
    )
    assert hold["test"] == "no shown loss" and hold["diff"]["high"] < -hold["diff"]["margin"]
    errors = np.random.default_rng(0).exponential(0.07, 300)
    d = decide(spec, GOOD, errors, GOOD, errors, "3", hold)
    assert not d.passed and "upper bound below the margin" in d.summary()
