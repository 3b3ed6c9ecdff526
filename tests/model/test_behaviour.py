"""A model trained on 10,000 synthetic rows: policy quality and behavioural tests."""

from __future__ import annotations

import copy
import json

import pytest

from model.artifact import load
from model.result import TrainResult
from model.synthetic import BOTS, World
from tests.helpers import train_small

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    _, out = train_small(
        tmp_path_factory.mktemp("quality"),
        seed=1,
        rows=10_000,
        epochs=None,
        extra=("--ground-truth", "synthetic"),
        train_seed=0,
    )
    return load(out / "artifact"), TrainResult.read(out).metrics


def test_learned_policy_beats_baselines_and_closes_half_the_gap(trained):
    _, m = trained
    print(
        {
            k: round(m[k], 4)
            for k in (
                "true_value_policy",
                "true_value_behaviour",
                "true_value_most_frequent",
                "true_value_oracle",
                "gap_closed",
            )
        }
    )
    assert m["true_value_policy"] > m["true_value_behaviour"]
    assert m["true_value_policy"] > m["true_value_most_frequent"]
    assert m["gap_closed"] >= 0.5
    assert m["auc"] > 0.65 and m["rmse"] < m["baseline_rmse"]


def _example(bot: str, seed: int = 0) -> dict:
    import numpy as np

    return BOTS[bot].context(np.random.default_rng(seed))


@pytest.mark.parametrize("bot", sorted(BOTS))
def test_invariant_to_key_order_and_whitespace(trained, bot):
    model, _ = trained
    x = _example(bot)
    shuffled = json.loads(json.dumps(dict(reversed(list(x.items()))), indent=4))
    a = model.rank_many([(bot, x, None)])[0]
    b = model.rank_many([(bot, shuffled, None)])[0]
    assert [r.action for r in a] == [r.action for r in b]
    assert [r.score for r in a] == pytest.approx([r.score for r in b], abs=1e-6)


DIRECTION = [
    # (bot, input change, action that the ground truth rewards more after the change)
    (
        "trading_advanced",
        {"indicators": {"rsi": 18.0, "volatility": 0.2}},
        {"action": "buy", "size": "small"},
    ),
    ("trading_advanced", {"indicators": {"rsi": 85.0, "volatility": 0.2}}, {"action": "sell"}),
    ("analytics_portfolio", {"portfolio": {"drawdown": 0.28}}, {"action": "hedge"}),
    ("analytics_portfolio", {"portfolio": {"concentration": 0.88}}, {"action": "rebalance"}),
    (
        "financial_stocks",
        {"fundamentals": {"pe_ratio": 8.0, "earnings_surprise": 0.12}},
        {"action": "recommend_buy"},
    ),
    ("platform_onboarding", {"user": {"kyc_status": "rejected"}}, {"action": "escalate_to_human"}),
]


def _merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize(("bot", "change", "action"), DIRECTION)
def test_direction(trained, bot, change, action):
    """When the ground truth rewards an action more, the model scores it higher."""
    model, _ = trained
    world = World()
    neutral = {
        "trading_advanced": {"indicators": {"rsi": 50.0, "volatility": 0.2}, "sentiment": -0.6},
        "analytics_portfolio": {
            "portfolio": {"drawdown": 0.05, "concentration": 0.3, "sharpe": 1.0}
        },
        "financial_stocks": {"fundamentals": {"pe_ratio": 50.0, "earnings_surprise": -0.1}},
        "platform_onboarding": {"user": {"kyc_status": "verified", "step": "funding"}},
    }[bot]
    before = _merge(_merge(_example(bot, 3), neutral), {})
    after = _merge(before, change)
    assert world.true_reward(bot, after, action) > world.true_reward(bot, before, action)
    dt = model.default_data_type[bot]
    s_before, s_after = model.score([(bot, dt, before, action), (bot, dt, after, action)])
    assert s_after > s_before


def _top_matches_truth(model, bot: str, contexts, clear_by: float) -> tuple[int, int]:
    """(hits, total): of the contexts whose truly best action leads the next by
    `clear_by` or more, how many the model ranks that action first."""
    world = World()
    hits = total = 0
    for x in contexts:
        true = sorted(world.rewards(bot, x), reverse=True)
        if true[0] - true[1] < clear_by:
            continue
        total += 1
        hits += model.rank_many([(bot, x, None)])[0][0].action == world.oracle_action(bot, x)
    return hits, total


@pytest.mark.parametrize("bot", sorted(BOTS))
def test_minimum_functionality_per_bot(trained, bot):
    """On clear-cut contexts the top-ranked action is the one the ground truth prefers."""
    import numpy as np

    model, _ = trained
    rng = np.random.default_rng(42)
    contexts = [BOTS[bot].context(rng) for _ in range(60)]
    hits, total = _top_matches_truth(model, bot, contexts, clear_by=0.3)
    assert total >= 10
    assert hits / total >= 0.8, f"{hits}/{total}"


LEVELS = [
    # (bot, the field, a value just below the level and one just above it): the ground
    # truth's best action changes at the level
    ("trading_advanced", ("indicators", "rsi"), 29.5, 30.5),
    ("trading_advanced", ("indicators", "rsi"), 69.5, 70.5),
    ("analytics_portfolio", ("portfolio", "drawdown"), 0.14, 0.16),
    ("analytics_portfolio", ("portfolio", "concentration"), 0.58, 0.62),
]


@pytest.mark.parametrize(("bot", "path", "below", "above"), LEVELS)
def test_decisions_change_at_the_level_not_around_it(trained, bot, path, below, above):
    """Either side of a level, half an RSI point or 2% of a portfolio share away, the
    top-ranked action is the ground truth's best (over several contexts): the step is
    at the level, not a ramp that gets the values near it wrong."""
    import numpy as np

    model, _ = trained
    rng = np.random.default_rng(7)
    contexts = []
    for _ in range(12):
        x = BOTS[bot].context(rng)
        if bot == "trading_advanced":  # out of the sentiment's way: its edge is the level's
            x = _merge(x, {"indicators": {"volatility": 0.2}, "sentiment": 0.0})
        contexts += [_merge(x, {path[0]: {path[1]: v}}) for v in (below, above)]
    hits, total = _top_matches_truth(model, bot, contexts, clear_by=0.1)
    assert total >= 12
    assert hits / total >= 0.9, f"{hits}/{total}"
