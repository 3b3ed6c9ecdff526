"""The network and the training recipe, without a Trainer."""

import pytest
import torch

from model.features import Featurizer
from model.module import ema, to_tensors
from model.network import ModelConfig, RewardEnsemble, RewardModel, build

ROWS = [("bot", "dt", {"rsi": float(v)}, {"action": a}) for v in range(10, 91) for a in "xy"]


def _batch(fz, values):
    return to_tensors(fz.encode([("bot", "dt", {"rsi": v}, {"action": "x"}) for v in values]))


def test_the_quantile_bins_carry_the_value_into_the_network():
    """With the standardised value's own path silenced, values on either side of a level
    (rsi 70 here) still score differently: through the bins alone. Silencing the bins
    too makes them score alike."""
    fz = Featurizer.build(ROWS, max_len=16, min_count=1)
    torch.manual_seed(0)
    net = RewardModel(ModelConfig.preset("small", fz.vocab_size, fz.max_len)).eval()
    assert net.bins is not None and net.cfg.num_bins == 32
    with torch.no_grad():
        net.num[-1].weight.zero_()
        net.num[-1].bias.zero_()
        a, b, c = net(*_batch(fz, [40.0, 69.0, 71.0])).tolist()
        assert min(abs(a - b), abs(b - c), abs(a - c)) > 1e-5  # alike below is < 1e-6
        net.bins.weight.zero_()
        a, b, c = net(*_batch(fz, [40.0, 69.0, 71.0])).tolist()
        assert a == pytest.approx(b, abs=1e-6) and b == pytest.approx(c, abs=1e-6)


def test_a_network_saved_before_the_bins_is_built_as_it_was():
    fz = Featurizer.build(ROWS, max_len=16, min_count=1)
    old = ModelConfig(fz.vocab_size, fz.max_len).to_dict()
    old.pop("num_bins")
    net = RewardModel(ModelConfig.from_dict(old))
    assert net.bins is None
    assert not any(k.startswith("bins") for k in net.state_dict())
    with torch.no_grad():
        assert net(*_batch(fz, [50.0])).shape == (1,)


def _score_seqs(net, fz, seqs):
    with torch.no_grad():
        return net(*to_tensors(fz.pad(seqs))).tolist()


@pytest.mark.parametrize("positions", ["leaf", "sequence"])
def test_with_leaf_places_where_a_leaf_falls_in_the_sequence_does_not_matter(positions):
    """A document is a set of leaves: the same tokens in another order score the same
    with leaf places (words stay tied to their leaf); with sequence positions they do not."""
    rows = [
        ("bot", "dt", {"rsi": float(v), "note": f"word{v % 3} up", "tag": "a"}, {"action": a})
        for v in range(10, 60)
        for a in "xy"
    ]
    fz = Featurizer.build(rows, max_len=32)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset)
    # (a prefix network needs leaf places: taken apart, a sequence index would differ)
    interaction = "prefix" if positions == "leaf" else "joint"
    net = RewardModel(
        ModelConfig(**{**cfg.to_dict(), "positions": positions, "interaction": interaction})
    ).eval()
    seq = fz.tokens(*rows[7][:4])
    moved = [seq[0], *reversed(seq[1:])]  # [CLS] first, every other token elsewhere
    same, other = _score_seqs(net, fz, [seq, moved])
    if positions == "leaf":
        assert same == pytest.approx(other, abs=1e-5)
    else:
        assert abs(same - other) > 1e-4


def test_a_network_saved_before_leaf_places_scores_by_sequence_position():
    fz = Featurizer.build(ROWS, max_len=16, min_count=1)
    old = ModelConfig.preset("small", fz.vocab_size, fz.max_len).to_dict()
    old.pop("positions")
    old.pop("num_paths")
    old.pop("interaction")
    net = RewardModel(ModelConfig.from_dict(old))
    assert net.cfg.positions == "sequence" and net.path_bins is None
    assert {k.split(".")[0] for k in net.state_dict()} >= {"pos", "bins"}
    assert not any(k.startswith(("place", "path_bins")) for k in net.state_dict())
    with torch.no_grad():
        assert net(*_batch(fz, [50.0])).shape == (1,)


def test_an_unknown_kind_of_positions_is_refused():
    with pytest.raises(ValueError, match="positions"):
        RewardModel(ModelConfig(20, 16, positions="absolute"))


def test_the_weight_average_follows_a_short_training_and_settles_on_a_long_one():
    avg = ema(0.99)
    first, later = torch.zeros(3), torch.ones(3)
    # after one averaged step the new weights weigh 1 - 2/11: not pulled back to the start
    assert avg(first, later, torch.tensor(1))[0] == pytest.approx(9 / 11)
    # much later the decay is the one asked for
    assert avg(first, later, torch.tensor(10_000))[0] == pytest.approx(0.01)


@pytest.mark.parametrize("total", [1, 2, 7, 10, 1000])
def test_the_learning_rate_warms_up_then_decays_to_zero_for_any_number_of_steps(total):
    from model.module import warmup_cosine

    factors = [warmup_cosine(s, total) for s in range(total + 1)]
    peak = factors.index(max(factors))
    assert max(factors) == 1.0 and all(0.0 <= f <= 1.0 for f in factors)
    assert factors[: peak + 1] == sorted(factors[: peak + 1])  # up ...
    assert factors[peak:] == sorted(factors[peak:], reverse=True)  # ... then down
    if total > 1:  # one step is all warm-up
        assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert peak <= max(1, round(0.1 * total))


def test_the_context_action_product_counts_leaves_and_no_padding():
    """A row scores the same alone and beside a longer row (whose padding it then
    has): the product's means are over the row's own leaves."""
    rows = [
        ("bot", "dt", {"rsi": float(v), "tag": "a"}, {"action": a}) for v in range(30) for a in "xy"
    ]
    fz = Featurizer.build(rows, max_len=32)
    torch.manual_seed(0)
    net = RewardModel(ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset))
    net.eval()
    assert {"cross_ctx", "cross_act"} <= {k.split(".")[0] for k in net.state_dict()}
    short = fz.tokens("bot", "dt", {"rsi": 3.0}, {"action": "x"})
    long = fz.tokens(
        "bot", "dt", {"rsi": 3.0, "tag": "a", "more": "free words here"}, {"action": "y"}
    )
    alone = _score_seqs(net, fz, [short])[0]
    beside = _score_seqs(net, fz, [short, long])[0]
    assert alone == pytest.approx(beside, abs=1e-5)
    # and the product is part of the score: without it the same row scores otherwise
    with torch.no_grad():
        net.cross_act.weight.zero_()
    assert abs(_score_seqs(net, fz, [short])[0] - alone) > 1e-4


def test_a_network_saved_before_the_product_is_built_without_it():
    fz = Featurizer.build(ROWS, max_len=16, min_count=1)
    old = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset).to_dict()
    assert old.pop("cross") is True
    net = RewardModel(ModelConfig.from_dict(old))
    assert not net.cfg.cross
    assert not any(k.startswith("cross") for k in net.state_dict())
    with torch.no_grad():
        assert net(*_batch(fz, [50.0])).shape == (1,)


def _levelled():
    """A featurizer whose rsi path has one level, at 30 (buy pays below it)."""
    rows = [("bot", "dt", {"rsi": v / 10}, {"action": a}) for v in range(100, 901) for a in "xy"]
    rewards = [0.8 * (r[2]["rsi"] < 30 and r[3]["action"] == "x") for r in rows]
    fz = Featurizer.build(rows, max_len=16, min_count=1, rewards=rewards)
    assert fz.cuts["in.rsi"] == [pytest.approx(29.95)]
    return fz


def test_the_interval_among_the_levels_reaches_the_network_on_its_own():
    """With the value and its bins silenced, two values either side of the level score
    differently and two on the same side alike: the step is exactly at the level."""
    fz = _levelled()
    torch.manual_seed(0)
    net = RewardModel(ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset))
    net.eval()
    assert net.cfg.num_cuts == 9 and net.cuts is not None
    with torch.no_grad():
        net.num[-1].weight.zero_()
        net.num[-1].bias.zero_()
        net.bins.weight.zero_()
        net.path_bins.weight.zero_()
        far, below, above, high = net(*_batch(fz, [12.0, 29.9, 30.0, 88.0])).tolist()
        assert far == pytest.approx(below, abs=1e-6) and above == pytest.approx(high, abs=1e-6)
        assert abs(below - above) > 1e-4
        net.cuts.weight.zero_()  # and without the intervals, all alike
        assert len({round(s, 6) for s in net(*_batch(fz, [12.0, 29.9, 30.0, 88.0])).tolist()}) == 1


def test_a_network_saved_before_the_levels_is_built_without_them():
    fz = _levelled()
    old = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset).to_dict()
    assert old.pop("num_cuts") == 9
    net = RewardModel(ModelConfig.from_dict(old))
    assert net.cuts is None and not any(k.startswith("cuts") for k in net.state_dict())
    with torch.no_grad():
        assert net(*_batch(fz, [50.0])).shape == (1,)


def test_a_network_with_levels_refuses_input_without_the_intervals():
    fz = _levelled()
    net = RewardModel(ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset))
    with pytest.raises(ValueError, match="interval"):
        net(*_batch(fz, [50.0])[:-1])


def test_an_ensemble_scores_the_mean_of_members_that_start_from_their_own_weights():
    fz = Featurizer.build(ROWS, max_len=16, min_count=1)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset, members=3)
    net = build(cfg).eval()
    assert isinstance(net, RewardEnsemble) and len(net.members) == 3
    x = _batch(fz, [20.0, 50.0, 80.0])
    with torch.no_grad():
        each = net.each(*x)
        assert each.shape == (3, 3)
        assert torch.allclose(net(*x), each.mean(0))
        assert each.std(0).min() > 1e-4  # three networks, not one three times


def test_one_member_is_the_plain_network_with_the_keys_artifacts_had():
    fz = Featurizer.build(ROWS, max_len=16, min_count=1)
    net = build(ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset))
    assert type(net) is RewardModel and "tok.weight" in net.state_dict()
    with torch.no_grad():
        assert net.each(*_batch(fz, [50.0])).shape == (1, 1)
    old = net.cfg.to_dict()
    old.pop("members")  # a config saved before members
    assert type(build(ModelConfig.from_dict(old))) is RewardModel
    with pytest.raises(ValueError, match="at least 1"):
        build(ModelConfig.from_dict(old | {"members": 0}))


def test_the_defaults_are_the_model_trained_today():
    """`ModelConfig` with only what the featurizer decides is the `small` preset."""
    fz = Featurizer.build(ROWS, max_len=16, min_count=1)
    today = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset)
    assert ModelConfig(fz.vocab_size, fz.max_len, num_paths=fz.word_offset) == today
    assert ModelConfig.from_dict(today.to_dict()) == today  # an artifact made today
    net = RewardModel(ModelConfig(fz.vocab_size, fz.max_len, num_paths=fz.word_offset))
    assert net.cuts is not None and net.cfg.cross and net.cfg.positions == "leaf"
