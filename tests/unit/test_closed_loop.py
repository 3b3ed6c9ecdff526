"""The loop's pure parts: the join of decisions with rewards, the gate's self-check on
logged decisions, and what the summary says of them."""

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from core.settings import GateSpec
from flows.gate import self_check
from flows.rewards import BotRewards, join
from flows.summary import render
from model.artifact import AgentModel
from model.decision import Query, decide
from model.features import Featurizer
from model.network import ModelConfig, RewardModel

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _decision(i: str, minutes_ago: float, reward=None, reward_after_min=None) -> dict:
    made = NOW - timedelta(minutes=minutes_ago)
    return {
        "id": i,
        "created_at": made,
        "bot": "trading_advanced",
        "data_type": "market_data",
        "input": json.dumps({"task": "t", "rsi": 40}),
        "candidates": None,
        "action": json.dumps({"action": "buy"}),
        "probability": 0.925,
        "model_version": "3",
        "exploration": json.dumps({"exploration": "epsilon", "epsilon": 0.1}),
        "reward": reward,
        "reward_at": None if reward is None else made + timedelta(minutes=reward_after_min),
        "reward_source": None if reward is None else "api",
    }


def test_the_join_takes_rewards_within_the_wait_once_and_counts_the_rest():
    decided = [
        _decision("api", 120, reward=0.5, reward_after_min=5),
        _decision("bot", 120),
        _decision("both", 120, reward=0.75, reward_after_min=1),
        _decision("late", 120, reward=0.1, reward_after_min=90),
        _decision("none", 120),
        _decision("recent", 10, reward=0.2, reward_after_min=1),
    ]
    bots = BotRewards({d["id"] for d in decided})
    bots.found = {
        "bot": (-0.25, NOW - timedelta(minutes=100)),
        "both": (-1.0, NOW - timedelta(minutes=100)),
    }
    table, counts = join(decided, bots, NOW, wait_s=3600, missing_reward=None)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {"api", "bot", "both"}
    assert (rows["api"]["reward"], rows["bot"]["reward"], rows["both"]["reward"]) == (
        0.5,
        -0.25,
        0.75,
    )
    assert (
        rows["api"]["propensity"] == 0.925
        and json.loads(rows["bot"]["decision"])["model_version"] == "3"
    )
    assert counts | {"default_reward": None} == counts
    assert (counts["logged"], counts["joined"], counts["waiting"]) == (6, 3, 1)
    assert (counts["without_reward"], counts["late_rewards"]) == (2, 1)
    assert (counts["from_api"], counts["from_bot_rows"]) == (2, 1)
    with_default, c = join(decided, bots, NOW, wait_s=3600, missing_reward=0.0)
    assert len(with_default) == 5 and c["without_reward"] == 2  # still counted as such


@pytest.fixture(scope="module")
def model():
    rows = [
        ("bot", "market_data", {"rsi": float(i)}, {"action": a}) for i in range(40) for a in "xy"
    ]
    fz = Featurizer.build(rows, max_len=32)
    torch.manual_seed(0)
    net = RewardModel(ModelConfig(fz.vocab_size, fz.max_len, num_paths=fz.word_offset))
    bank = {"bot": [{"action": a} for a in "xyzw"]}
    return AgentModel(net, fz, bank, {"bot": "market_data"})


def _holdout(model, version: str, n: int = 300) -> pd.DataFrame:
    made = decide(
        model, [Query.of("bot", "go", {"rsi": float(i % 80)}) for i in range(n)], version=version
    )
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "bot": [d.record["bot"] for d in made],
            "data_type": [d.record["data_type"] for d in made],
            "input": [d.record["input"] for d in made],
            "action": [d.record["action"] for d in made],
            "reward": rng.uniform(0.2, 0.8, n),
            "propensity": [d.record["probability"] for d in made],
            "decision": [
                json.dumps(
                    {
                        "model_version": version,
                        "candidates": None,
                        "exploration": d.record["exploration"],
                    }
                )
                for d in made
            ],
        }
    )


def test_the_self_check_agrees_on_the_champions_own_decisions_and_warns_when_it_cannot(model):
    holdout = _holdout(model, "4")
    check = self_check(GateSpec(), model, "4", holdout)
    assert check["rows"] == 300 and check["agrees"] and check["warning"] is None
    assert check["ips"] == pytest.approx(check["observed"]) and check["max_weight_gap"] < 1e-6
    assert self_check(GateSpec(), model, "5", holdout) is None  # none of v5's decisions
    wrong = holdout.assign(propensity=holdout["propensity"] / 2)  # not what was served
    bad = self_check(GateSpec(), model, "4", wrong)
    assert (
        not bad["agrees"] and "the logged probabilities are not what v4 computes" in bad["warning"]
    )
    md = render(
        {
            "decision": "Rejected",
            "gate": {
                "challenger": {},
                "passed": False,
                "reasons": ["x"],
                "value": {"propensities": {"logged": 300, "estimated": 20}, "self_check": bad},
            },
        }
    )
    assert "Propensities: 300 holdout rows with the probability logged" in md
    assert "20 estimated by the behaviour model" in md and "**WARNING**" in md
