"""Decisions: explicit exploration, probabilities that replay, choices drawn by the id."""

import math
import uuid

import numpy as np
import pytest
import torch

from model.artifact import AgentModel
from model.config import Exploration
from model.decision import Query, decide, draw, replay
from model.features import Featurizer
from model.network import ModelConfig, RewardModel

BANK = [{"action": "buy"}, {"action": "sell"}, {"action": "hold", "size": 2}, {"action": "wait"}]


@pytest.fixture(scope="module")
def model():
    rows = [
        ("bot", "market_data", {"rsi": float(i), "note": f"word{i % 3} up"}, {"action": a})
        for i in range(40)
        for a in ("buy", "sell")
    ]
    fz = Featurizer.build(rows, max_len=32)
    torch.manual_seed(0)
    net = RewardModel(ModelConfig(fz.vocab_size, fz.max_len, num_paths=fz.word_offset))
    return AgentModel(net, fz, {"bot": BANK}, {"bot": "market_data"})


@pytest.mark.parametrize(
    "policy",
    [
        Exploration(),
        Exploration(epsilon=0.0, min_probability=0.0),
        Exploration(exploration="softmax", temperature=0.01),
        Exploration(exploration="softmax", min_probability=0.2),
        Exploration(epsilon=1.0),
    ],
)
def test_probabilities_sum_to_one_and_keep_their_floor(policy):
    lowers = [0.31, 0.3, -0.2, -0.9]
    p = policy.probabilities(lowers)
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and np.all(
        p > 0 if policy.min_probability else p >= 0
    )
    assert p.min() >= min(policy.min_probability, 1 / 4) - 1e-12
    assert list(p) == sorted(p, reverse=True)  # better lower bound, no less likely


def test_epsilon_greedy_and_softmax_are_what_they_say():
    eps = Exploration(epsilon=0.2, min_probability=0.0).probabilities([1.0, 0.5, 0.0, -1.0])
    np.testing.assert_allclose(eps, [0.85, 0.05, 0.05, 0.05])
    soft = Exploration(exploration="softmax", temperature=0.5, min_probability=0.0)
    p = soft.probabilities([1.0, 0.5])
    assert p[0] / p[1] == pytest.approx(math.exp(1.0))
    with pytest.raises(ValueError, match="epsilon"):
        Exploration(epsilon=1.5)
    with pytest.raises(ValueError, match="exploration"):
        Exploration(exploration="thompson")


def test_the_draw_is_the_ids_and_follows_the_probabilities():
    p = [0.7, 0.2, 0.1]
    assert {draw("same-id", p) for _ in range(5)} == {draw("same-id", p)}
    picks = np.bincount([draw(str(uuid.uuid4()), p) for _ in range(20_000)], minlength=3)
    np.testing.assert_allclose(picks / picks.sum(), p, atol=0.015)


def test_a_logged_decision_replays_to_its_probabilities_and_choice(model):
    queries = [Query.of("bot", "go", {"rsi": float(i)}) for i in range(200)]
    for d in decide(model, queries, Exploration(exploration="softmax", temperature=0.002), "7"):
        probs, k = replay(d.record)
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        ranking = d.record["ranking"]
        assert probs == pytest.approx([r["probability"] for r in ranking], abs=1e-12)
        assert ranking[k]["action"] == d.record["action"] == d.answer["result"]["action"]
        assert d.answer["probability"] == pytest.approx(d.record["probability"], abs=1e-6)
        assert d.answer["explored"] == (k != 0) and d.record["model_version"] == "7"


def test_the_same_decision_id_gets_the_same_answer(model):
    q = Query.of("bot", "go", {"rsi": 12.0}, decision_id="client-42")
    first, again = decide(model, [q])[0], decide(model, [q, q])[1]
    assert first.answer == again.answer and first.answer["decision_id"] == "client-42"


def test_over_ten_thousand_decisions_the_explored_share_is_the_settings(model):
    """epsilon-greedy explores (a candidate other than the best) with probability
    epsilon * (K - 1) / K: the observed share lies in its binomial 99.9% interval."""
    n = 10_000
    queries = [Query.of("bot", "go", {"rsi": float(i % 90)}) for i in range(n)]
    made = decide(model, queries, Exploration(epsilon=0.1))
    explored = sum(d.answer["explored"] for d in made)
    expected = 0.1 * 3 / 4
    half = 3.29 * math.sqrt(expected * (1 - expected) / n)
    assert abs(explored / n - expected) <= half, (explored, expected)
    assert {d.answer["probability"] for d in made} == {0.925, 0.025}


def test_an_agent_the_model_does_not_know_is_refused_before_any_ranking(model):
    from model.decision import UnknownAgent

    for agent in ("no_such_bot", None):
        with pytest.raises(UnknownAgent, match=f"unknown agent {agent!r}; known: bot"):
            decide(model, [Query.of("bot", "t", {}), Query.of(agent, "t", {})])
    # with candidates of its own, any agent is ranked
    (made,) = decide(model, [Query.of("no_such_bot", "t", {"candidates": BANK[:2]})])
    assert made.answer["result"]["action"] in BANK[:2]
