"""The prefix network: a request's context encoded once, each action embedded once per
model, and the pairs scored apart exactly as the joined sequences score."""

import numpy as np
import pytest
import torch

import model.artifact as artifact
from model.artifact import AgentModel, action_bank
from model.features import Featurizer
from model.network import ModelConfig, RewardModel, build
from model.synthetic import World


@pytest.fixture(autouse=True)
def _always_apart(monkeypatch):
    """Every ranking apart, however few its pairs (the threshold is a matter of cost)."""
    monkeypatch.setattr(artifact, "APART_MIN_PAIRS", 0)


def _model(members: int = 1, hard: bool = True, seed: int = 0, max_len: int = 64):
    df = World(seed=0, hard=hard).generate(300)
    rows = list(zip(df.bot, df.data_type, df.input, df.action, strict=True))
    fz = Featurizer.build(rows, max_len=max_len, rewards=df.reward)
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset, members=members)
    return AgentModel(build(cfg), fz, action_bank(df)), df


def _apart_and_joined(model: AgentModel, requests, data_types):
    """Each candidate's score ranked apart, and the same pairs scored joined."""
    ranked = model.rank_many(requests, data_types)
    pairs = [
        (bot, dt, x, r.action)
        for (bot, x, _), dt, rs in zip(requests, data_types, ranked, strict=True)
        for r in rs
    ]
    apart = np.array([r.score for rs in ranked for r in rs])
    return apart, model.score(pairs)


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("hard", [False, True])
def test_apart_every_pair_scores_as_its_joined_sequence(members, hard):
    model, df = _model(members, hard)
    assert model.net.prefix
    requests = [(b, x, None) for b, x in zip(df.bot[:40], df.input[:40], strict=True)]
    # candidates of the request's own, one of them never seen in training
    requests[3] = (requests[3][0], requests[3][1], [{"action": "new", "size_pct": 5}, {"x": 1}])
    data_types = list(df.data_type[:40])
    for _ in range(2):  # the second time, the bank's actions come from the model's cache
        apart, joined = _apart_and_joined(model, requests, data_types)
        assert len(apart) > 100
        assert np.abs(apart - joined).max() < 1e-5
    assert model._vectors  # kept for the next requests


def test_the_action_changes_the_score_though_the_context_never_sees_it():
    model, df = _model()
    bot, x = df.bot[0], df.input[0]
    ranked = model.rank_many([(bot, x, None)])[0]
    assert len({round(r.score, 6) for r in ranked}) == len(ranked) > 1


def test_a_long_context_is_cut_as_training_cut_it():
    """A context longer than the sequence leaves room for is cut before its
    candidates' tokens, apart as joined."""
    model, df = _model(max_len=16)
    bot = df.bot[0]
    x = {"task": " ".join(f"word{i}" for i in range(40)), **df.input[0]}
    candidates = [{"action": "hold"}, {"action": "sell"}]  # the same number of tokens
    apart, joined = _apart_and_joined(model, [(bot, x, candidates)], [df.data_type[0]])
    assert np.abs(apart - joined).max() < 1e-5


def test_the_kept_actions_are_bounded(monkeypatch):
    monkeypatch.setattr(artifact, "ACTIONS_KEPT", 5)
    model, df = _model()
    candidates = [{"action": "buy", "size_pct": n} for n in range(20)]
    requests = [(df.bot[0], df.input[0], candidates)] * 2
    apart, joined = _apart_and_joined(model, requests, [df.data_type[0]] * 2)
    assert np.abs(apart - joined).max() < 1e-5
    assert len(model._vectors) == 5 and len(model._tokens_of) == 5


def test_a_few_pairs_go_joined_and_many_apart_with_the_same_scores(monkeypatch):
    monkeypatch.setattr(artifact, "APART_MIN_PAIRS", 8)
    model, df = _model()  # the hard world: 8 actions per bot
    apart_calls = []
    score_apart = model._score_apart
    monkeypatch.setattr(model, "_score_apart", lambda *a: apart_calls.append(1) or score_apart(*a))
    one = [(df.bot[0], df.input[0], [{"action": "hold"}, {"action": "sell"}])]
    few = model.rank_many(one)[0]
    assert not apart_calls  # 2 pairs: joined
    many = model.rank_many(one * 4)[0]
    assert apart_calls  # 8 pairs: apart
    assert [r.score for r in few] == pytest.approx([r.score for r in many], abs=1e-5)


def test_a_network_saved_before_the_prefix_is_built_joint():
    model, _ = _model()
    old = model.net.cfg.to_dict()
    assert old.pop("interaction") == "prefix"
    net = RewardModel(ModelConfig.from_dict(old))
    assert net.cfg.interaction == "joint" and not net.prefix
    # the same weights' names as before: an old artifact's file loads into it
    assert set(net.state_dict()) == set(model.net.state_dict())


def test_an_unknown_interaction_and_a_prefix_over_sequence_positions_are_refused():
    with pytest.raises(ValueError, match="interaction"):
        RewardModel(ModelConfig(20, 16, interaction="sideways"))
    with pytest.raises(ValueError, match="leaf"):
        RewardModel(ModelConfig(20, 16, positions="sequence", interaction="prefix"))
