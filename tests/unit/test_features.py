import json

import numpy as np
import pytest

from model.features import CLS, PAD, SEP, UNK_PATH, Featurizer, canonical_json, leaves

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
    assert fz.paths["act.action"] in ids[sep:]
    assert ids[-1] == PAD


def test_action_is_never_truncated():
    long = {"task": " ".join(["word"] * 200), **{f"k{i}": i for i in range(100)}}
    fz = Featurizer.build([("b", "d", long, {"action": "x"})], max_len=16, min_count=1)
    enc = fz.encode([("b", "d", long, {"action": "x"})])
    ids = list(enc.ids[0])
    assert len(ids) == 16 and SEP in ids and fz.paths["act.action"] in ids


def test_unknown_paths_and_words_do_not_fail(fz):
    enc = fz.encode([("new_bot", "market_data", {"unseen": 3, "task": "zzz qqq"}, {"action": "x"})])
    assert UNK_PATH in enc.ids[0]


def test_round_trip_through_json(fz):
    again = Featurizer.from_json(fz.to_json())
    a, b = fz.encode(ROWS), again.encode(ROWS)
    for f in ("ids", "nums", "is_num", "segment"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert again.vocab_size == fz.vocab_size
