"""The tree teacher: flattened pairs, a rule of thresholds and flags learned from rows."""

from __future__ import annotations

import numpy as np

from model.trees import TreeTeacher, flat


def test_pairs_flatten_to_numbers_and_indicators_and_text_is_left_out():
    feats, numbers = flat(
        "b",
        "execute",
        {"amount": 12, "vip": True, "note": "x" * 65, "tags": ["a", "c"]},
        {"kind": "buy", "size": 2.5, "huge": 10**400},
    )
    assert feats == {
        "bot=b": 1.0,
        "dt=execute": 1.0,
        "in.amount": 12.0,
        "in.vip=True": 1.0,
        "in.tags[]=a": 1.0,
        "in.tags[]=c": 1.0,
        "act.kind=buy": 1.0,
        "act.size": 2.5,
    }
    assert numbers == {"in.amount", "act.size"}


def _rows(n: int, seed: int):
    """reward 1 when a buy meets an amount over 50 or a sell meets a flagged account,
    else 0, with noise; some inputs lack the amount."""
    rng = np.random.default_rng(seed)
    rows, rewards = [], []
    for _ in range(n):
        x = {"flag": bool(rng.random() < 0.5)}
        if rng.random() < 0.9:
            x["amount"] = float(rng.uniform(0, 100))
        kind = "buy" if rng.random() < 0.5 else "sell"
        good = (kind == "buy" and x.get("amount", 0) > 50) or (kind == "sell" and x["flag"])
        rows.append(("b", "execute", x, {"kind": kind}))
        rewards.append(float(good) + rng.normal(0, 0.3))
    return rows, np.array(rewards)


def test_the_trees_learn_a_rule_of_a_threshold_and_a_flag():
    rows, rewards = _rows(2000, 0)
    trees = TreeTeacher.fit(rows, rewards, seed=0, threads=1)
    test, _ = _rows(500, 1)
    pred = trees.predict(test)
    truth = np.array(
        [
            (a["kind"] == "buy" and x.get("amount", 0) > 50) or (a["kind"] == "sell" and x["flag"])
            for _, _, x, a in test
        ]
    )
    assert pred.dtype == np.float32 and pred.shape == (500,)
    assert ((pred > 0.5) == truth).mean() > 0.95
    assert trees.predict([]).shape == (0,)


def test_absent_numbers_are_missing_to_the_trees_and_absent_indicators_zero():
    rows, rewards = _rows(300, 2)
    trees = TreeTeacher.fit(rows, rewards, threads=1)
    m = trees._matrix([flat("b", "execute", {}, {"kind": "buy"})[0]])
    assert np.isnan(m[0, trees.columns["in.amount"]])
    assert m[0, trees.columns["in.flag=True"]] == 0
    assert m[0, trees.columns["act.kind=buy"]] == 1


def test_only_the_most_frequent_features_become_columns():
    rows = [("b", "execute", {f"k{i}": "v"}, {"kind": "buy"}) for i in range(50)]
    trees = TreeTeacher.fit(rows, np.zeros(50), threads=1, max_columns=3)
    # every row has these three; each k{i} only one row
    assert set(trees.columns) == {"bot=b", "dt=execute", "act.kind=buy"}
    assert trees.predict([("b", "execute", {"new": 1}, {"kind": "sell"})]).shape == (1,)


def test_predictions_in_chunks_are_the_predictions_at_once():
    rows, rewards = _rows(300, 3)
    trees = TreeTeacher.fit(rows, rewards, threads=1)
    np.testing.assert_array_equal(trees.predict(rows, chunk=7), trees.predict(rows))
