import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.features import (
    CLS,
    MAX_WORDS_PER_LEAF,
    PAD,
    SEP,
    UNK_PATH,
    Featurizer,
    canonical_json,
    leaves,
)

ROWS = [
    (
        "trading_advanced",
        "market_data",
        {"task": "Analyze AAPL stock", "symbol": "AAPL", "indicators": {"rsi": r, "macd": 0.1}},
        {"action": a},
    )
    for r in (20.0, 50.0, 80.0)
    for a in ("buy", "sell", "hold")
]


@pytest.fixture(scope="module")
def fz():
    return Featurizer.build(ROWS, max_len=32, min_count=1)


def test_canonical_json_ignores_key_order_and_whitespace():
    assert canonical_json({"b": 1, "a": {"y": 2, "x": 3}}) == canonical_json(
        json.loads('{ "a" : { "x" : 3 , "y" : 2 } ,\n "b" : 1 }')
    )


def test_leaves_are_sorted_paths():
    got = list(leaves({"b": [1, {"c": True}], "a": None}, "in"))
    assert got == [("in.a", None), ("in.b[]", 1), ("in.b[].c", True)]


def test_numbers_are_values_beside_their_path(fz):
    lo = fz.encode([ROWS[0]])
    hi = fz.encode([ROWS[6]])  # same but rsi 80
    rsi = fz.paths["in.indicators.rsi"]
    i = list(lo.ids[0]).index(rsi)
    assert lo.is_num[0, i] == 1.0 and hi.ids[0, i] == rsi
    assert hi.nums[0, i] > 0 > lo.nums[0, i]  # standardised per path
    assert (lo.ids == hi.ids).all()  # only the value differs, not the tokens


def test_sequence_layout_and_segments(fz):
    enc = fz.encode([ROWS[1]])
    ids, seg = list(enc.ids[0]), list(enc.segment[0])
    assert ids[0] == CLS and SEP in ids
    sep = ids.index(SEP)
    assert all(s == 0 for s in seg[:sep]) and seg[sep] == 1
    assert fz.category("act.action", "sell") in ids[sep:]
    assert ids[-1] == PAD


def test_action_is_never_truncated():
    long = {"task": " ".join(["word"] * 200), **{f"k{i}": i for i in range(100)}}
    fz = Featurizer.build([("b", "d", long, {"action": "x"})], max_len=16, min_count=1)
    enc = fz.encode([("b", "d", long, {"action": "x"})])
    ids = list(enc.ids[0])
    assert len(ids) == 16 and SEP in ids and fz.category("act.action", "x") in ids


def test_unknown_paths_and_words_do_not_fail(fz):
    enc = fz.encode([("new_bot", "market_data", {"unseen": 3, "task": "zzz qqq"}, {"action": "x"})])
    assert UNK_PATH in enc.ids[0]


def test_round_trip_through_json(fz):
    again = Featurizer.from_json(fz.to_json())
    a, b = fz.encode(ROWS), again.encode(ROWS)
    for f in ("ids", "nums", "is_num", "segment", "quant"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert again.vocab_size == fz.vocab_size


def test_a_number_carries_its_quantile_among_the_training_values():
    rows = [("bot", "dt", {"rsi": float(v)}, {"action": "a"}) for v in range(10, 91)]
    fz = Featurizer.build(rows, max_len=16, min_count=1)

    def quantile(v):
        (tok,) = [t for t in fz.tokens("bot", "dt", {"rsi": v}, {"action": "a"}) if t[2] == 1.0]
        return tok[4]

    qs = [quantile(v) for v in (-1e9, 10.0, 30.0, 50.0, 70.0, 90.0, 1e9)]
    assert qs == sorted(qs) and qs[0] == 0.0 and qs[-1] == 1.0  # monotone, clipped
    assert qs[2] == pytest.approx(0.25, abs=0.02) and qs[4] == pytest.approx(0.75, abs=0.02)
    words = [t for t in fz.tokens("bot", "dt", {"rsi": "high"}, {"action": "a"}) if t[2] == 0.0]
    assert all(t[4] == 0.0 for t in words)  # text carries no quantile


def test_a_featurizer_saved_before_quantiles_still_loads():
    old = json.loads(_small_featurizer().to_json())
    del old["quantiles"]
    fz = Featurizer.from_json(json.dumps(old))
    enc = fz.encode([("bot", "market_data", {"rsi": 3.0}, {"action": "buy"})])
    assert fz.quantiles == {} and enc.is_num.sum() == 1.0


def test_a_few_short_values_of_a_path_are_categories_of_one_token_each():
    rows = [
        ("bot", "dt", {"status": s, "channel": c, "note": f"free text {i}"}, {"action": a})
        for i, (s, c, a) in enumerate(
            (s, c, a) for s in ("none", "pending") for c in ("app", "web") for a in ("x", "y")
        )
        for _ in range(3)
    ]
    rows += [("bot", "dt", {"note": f"more text {i}"}, {"action": "x"}) for i in range(70)]
    rows += [("bot", "dt", {"status": "once"}, {"action": "x"})]
    fz = Featurizer.build(rows, max_len=32)
    assert fz.categories["in.status"] == ["none", "pending"]  # "once" was seen once
    assert fz.categories["act.action"] == ["x", "y"]
    assert "in.note" not in fz.categories  # free text: too many distinct values
    ids = {fz.category(p, v) for p, vs in fz.categories.items() for v in vs}
    assert len(ids) == sum(map(len, fz.categories.values())) and max(ids) < fz.vocab_size
    pending = fz.tokens("bot", "dt", {"status": "pending"}, {"action": "y"})
    first = [t[0] for t in pending]
    assert fz.category("in.status", "pending") in first and fz.paths["in.status"] not in first
    assert fz.category("act.action", "y") in first
    # a category is its token alone: its words would say the same again
    assert all(t[5] == 0 and t[6] == PAD for t in pending)  # every value is a category
    # an unseen value is its path and its words, as before categories
    other = fz.tokens("bot", "dt", {"status": "rejected"}, {"action": "y"})
    assert fz.paths["in.status"] in [t[0] for t in other]
    assert [t[5] for t in other if t[6] == fz.paths["in.status"]] == [1]  # "rejected"
    again = Featurizer.from_json(fz.to_json())
    assert again.tokens("bot", "dt", {"status": "pending"}, {"action": "y"}) == pending


def test_words_carry_their_place_in_the_leaf_and_the_leaf_path():
    fz = _small_featurizer()
    # values not seen in training: their words follow their path's token
    seq = fz.tokens("bot", "market_data", {"note": "word1 down", "rsi": 3.0}, {"action": "up"})
    note = [t for t in seq if t[6] == fz.paths["in.note"]]
    assert [t[5] for t in note] == [1, 2]  # "word1", "down" (unknown)
    up = [t for t in seq if t[6] == fz.paths["act.action"]]
    assert [t[5] for t in up] == [1] and up[0][3] == 1
    assert all(t[5] == 0 for t in seq if t[6] == PAD)  # a leaf's first token, [CLS], [SEP]


def test_a_featurizer_saved_before_categories_stood_alone_keeps_their_words():
    fz = _small_featurizer()
    row = ("bot", "market_data", {"note": "word1 up", "rsi": 3.0}, {"action": "buy"})
    assert not any(t[5] for t in fz.tokens(*row))  # categories alone: no words
    old = json.loads(fz.to_json())
    del old["words_after_category"]
    before = Featurizer.from_json(json.dumps(old))
    seq = before.tokens(*row)
    note = [t for t in seq if t[6] == fz.paths["in.note"]]
    assert [t[5] for t in note] == [1, 2] and fz.category("in.note", "word1 up") in [
        t[0] for t in seq
    ]
    assert Featurizer.from_json(fz.to_json()).tokens(*row) == fz.tokens(*row)


def test_a_featurizer_saved_before_categories_still_loads():
    fz = _small_featurizer()
    assert fz.categories
    old = json.loads(fz.to_json())
    del old["categories"]
    before = Featurizer.from_json(json.dumps(old))
    ids = [t[0] for t in before.tokens("bot", "market_data", {"rsi": 3.0}, {"action": "buy"})]
    assert before.categories == {} and before.vocab_size < fz.vocab_size
    assert before.paths["act.action"] in ids and max(ids) < before.vocab_size


def _small_featurizer():
    from model.features import Featurizer

    rows = [
        ("bot", "market_data", {"rsi": float(i), "note": f"word{i % 3} up"}, {"action": a})
        for i in range(40)
        for a in ("buy", "sell")
    ]
    return Featurizer.build(rows, max_len=32)


def test_tokens_are_bounded_and_numbers_out_of_range_are_missing():
    fz = _small_featurizer()
    huge = {f"k{i}": "word1 " * 500 for i in range(300)} | {"big": 10**400, "nan": float("nan")}
    seq = fz.tokens("bot", "market_data", huge, {"action": "buy", "n": -(10**500)})
    assert len(seq) <= fz.max_len
    big = [t for t in fz.tokens("bot", "market_data", {"big": 10**400}, {"a": 1}) if t[0] > 4]
    assert all(t[2] == 0.0 and t[1] == 0.0 for t in big[:3])  # path token only, no value


def test_building_on_rows_with_numbers_beyond_float_range_counts_them_as_missing():
    rows = [
        ("bot", "market_data", {"x": float(i), "big": 10**400, "inf": float("inf")}, {"a": "b"})
        for i in range(30)
    ]
    fz = Featurizer.build(rows, max_len=32)  # no OverflowError
    assert fz.missing_numbers == 60
    assert "in.big" not in fz.num_stats and fz.num_stats["in.x"][0] == 14.5


@settings(max_examples=150, deadline=None)
@given(
    x=st.dictionaries(
        st.text(max_size=6),
        st.recursive(
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(min_value=-(10**400), max_value=10**400),
                st.floats(),
                st.text(max_size=30),
            ),
            lambda inner: st.one_of(
                st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
            ),
            max_leaves=40,
        ),
        max_size=5,
    )
)
def test_any_input_featurizes_within_the_length(x):
    fz = _small_featurizer()
    seq = fz.tokens("bot", "market_data", x, {"action": "buy"})
    assert 2 <= len(seq) <= fz.max_len
    assert all(math.isfinite(v) and 0.0 <= q <= 1.0 for _, v, _, _, q, *_ in seq)
    assert all(0 <= place <= MAX_WORDS_PER_LEAF and leaf < fz.vocab_size for *_, place, leaf in seq)


def test_ranking_featurizes_each_context_once_and_scores_as_the_full_rows_would():
    import torch

    from model.artifact import AgentModel
    from model.network import ModelConfig, RewardModel

    fz = _small_featurizer()
    torch.manual_seed(0)
    net = RewardModel(ModelConfig.preset("small", fz.vocab_size, fz.max_len))
    bank = {"bot": [{"action": "buy"}, {"action": "sell"}, {"action": "hold", "size": 2}]}
    model = AgentModel(net, fz, bank, {"bot": "market_data"})
    x = {"rsi": 71.0, "note": "word1 up " * 40, "deep": {"a": [1, 2, {"b": "word2"}]}}
    (ranked,) = model.rank_many([("bot", x, None)])
    full = model.score([("bot", "market_data", x, a) for a in bank["bot"]])
    by_action = {json.dumps(r.action, sort_keys=True): r.score for r in ranked}
    for a, score in zip(bank["bot"], full, strict=True):
        assert by_action[json.dumps(a, sort_keys=True)] == pytest.approx(float(score), abs=1e-6)


def test_a_rarely_logged_action_ranks_by_its_lower_bound_and_an_unseen_one_as_logged_once():
    import torch

    from model.artifact import AgentModel, Support
    from model.network import ModelConfig, RewardModel

    fz = _small_featurizer()
    torch.manual_seed(0)
    net = RewardModel(ModelConfig.preset("small", fz.vocab_size, fz.max_len))
    acts = [{"action": "buy"}, {"action": "sell"}, {"action": "hold", "size": 2}]
    x = {"rsi": 71.0}
    plain = AgentModel(net, fz, {"bot": acts}, {"bot": "market_data"})
    (by_score,) = plain.rank_many([("bot", x, None)])
    assert [r.lower for r in by_score] == [r.score for r in by_score]  # no support: score
    top, *_, last = by_score
    # the best-scored action was logged once, the others a thousand times: a penalty
    # above the spread of the scores sends it to the bottom, by its lower bound
    spread = top.score - last.score
    counts = {json.dumps(a, sort_keys=True): 1000 for a in acts}
    counts[json.dumps(top.action, sort_keys=True)] = 1
    counts = [counts[json.dumps(a, sort_keys=True)] for a in acts]
    doc = {"counts": {"bot": counts}, "pessimism": 2.0, "noise_sd": spread * 2}
    support = Support.from_json(doc, {"bot": acts})
    cautious = AgentModel(net, fz, {"bot": acts}, {"bot": "market_data"}, support=support)
    (ranked,) = cautious.rank_many([("bot", x, None)])
    assert ranked[-1].action == top.action and ranked[0].action != top.action
    for r in ranked:
        n = 1 if r.action == top.action else 1000
        assert r.lower == pytest.approx(r.score - 4 * spread / n**0.5, rel=1e-5)
    assert [r.score for r in ranked] != sorted((r.score for r in ranked), reverse=True)
    # a candidate outside the bank: no rows show it, it is lowered as if logged once
    new = {"action": "buy", "size": 7}
    (ranked,) = cautious.rank_many([("bot", x, [new, acts[1]])])
    (got,) = [r for r in ranked if r.action == new]
    assert got.lower == pytest.approx(got.score - 4 * spread, rel=1e-5)
    for bad in ({**doc, "pessimism": -1.0}, {**doc, "noise_sd": float("nan")}):
        with pytest.raises(ValueError, match="pessimism"):
            Support.from_json(bad, {"bot": acts})


def test_the_quantile_is_the_training_values_piecewise_linear_cdf():
    rows = [("bot", "dt", {"x": v}, {"action": "a"}) for v in (1.0, 2.0, 4.0, 8.0, 8.0)]
    fz = Featurizer.build(rows, max_len=16, min_count=1)
    q = fz.quantiles["in.x"]
    grid = np.linspace(0, 1, len(q))
    for v in (-3.0, 1.0, 1.5, 2.0, 3.3, 7.99, 8.0, 100.0):
        assert fz._quantile("in.x", v) == pytest.approx(float(np.interp(v, q, grid)))
    assert fz._quantile("in.unseen", 3.0) == 0.5


def _rsi_rows(n=2000, seed=0):
    """`buy` pays below rsi 30, `sell` above 70: two levels the rewards step at."""
    rng = np.random.default_rng(seed)
    rows, rewards = [], []
    for _ in range(n):
        rsi = round(float(rng.uniform(10, 90)), 1)
        action = str(rng.choice(["buy", "sell"]))
        pays = rsi < 30 if action == "buy" else rsi > 70
        rows.append(
            ("bot", "dt", {"rsi": rsi, "price": float(rng.uniform(1, 9))}, {"action": action})
        )
        rewards.append(0.8 * pays + float(rng.normal(0, 0.25)))
    return rows, rewards


def test_built_with_rewards_a_number_carries_the_interval_between_its_paths_levels():
    rows, rewards = _rsi_rows()
    fz = Featurizer.build(rows, max_len=16, rewards=rewards)
    (lo, hi) = fz.cuts["in.rsi"]
    assert lo == pytest.approx(30, abs=0.3) and hi == pytest.approx(70, abs=0.3)
    assert "in.price" not in fz.cuts  # the price changes no reward

    def interval(v):
        (tok,) = [t for t in fz.tokens("bot", "dt", {"rsi": v}, {"action": "buy"}) if t[2] == 1.0]
        return tok[7]

    assert [interval(v) for v in (lo - 0.05, lo + 0.05, 50.0, hi - 0.05, hi + 0.05)] == [
        0,
        1,
        1,
        1,
        2,
    ]
    words = fz.tokens("bot", "dt", {"rsi": "high"}, {"action": "buy"})
    assert all(t[7] == 0 for t in words)  # text has no interval
    enc = fz.encode([("bot", "dt", {"rsi": 80.0}, {"action": "sell"})])
    assert enc.cut.max() == 2 and enc.cut.dtype == np.int64


def test_built_without_rewards_there_are_no_levels_and_every_interval_is_0():
    rows, _ = _rsi_rows(500)
    fz = Featurizer.build(rows, max_len=16)
    assert fz.cuts == {}
    assert fz.encode(rows[:20]).cut.max() == 0


def test_levels_survive_the_round_trip_and_a_featurizer_saved_before_them_loads():
    rows, rewards = _rsi_rows()
    fz = Featurizer.build(rows, max_len=16, rewards=rewards)
    again = Featurizer.from_json(fz.to_json())
    assert again.cuts == fz.cuts
    np.testing.assert_array_equal(again.encode(rows[:50]).cut, fz.encode(rows[:50]).cut)
    old = json.loads(fz.to_json())
    del old["cuts"]
    before = Featurizer.from_json(json.dumps(old))
    assert before.cuts == {} and before.encode(rows[:50]).cut.max() == 0
