"""The shadow: the Challenger's view of decisions, the worker's budget, the live
estimates and the verdict (no services: a small model and stand-in followers)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.settings import GateSpec
from flows.shadow import PROMOTE, REJECT, WAIT, judge, summarise
from model.artifact import AgentModel
from model.config import Exploration
from model.decision import Query, decide, shadow
from model.features import Featurizer
from model.network import ModelConfig, RewardModel
from model.offpolicy import live_estimates
from serving.follower import ReloadStatus, Served
from serving.shadow import Shadow, sampled

BANK = [{"action": "buy"}, {"action": "sell"}, {"action": "hold", "size": 2}, {"action": "wait"}]


def _model(seed: int, bots=("bot",)) -> AgentModel:
    rows = [
        (b, "market_data", {"rsi": float(i), "note": f"word{i % 3} up"}, {"action": a})
        for b in bots
        for i in range(40)
        for a in ("buy", "sell")
    ]
    fz = Featurizer.build(rows, max_len=32)
    torch.manual_seed(seed)
    net = RewardModel(ModelConfig(fz.vocab_size, fz.max_len, num_paths=fz.word_offset))
    return AgentModel(net, fz, {b: BANK for b in bots}, {b: "market_data" for b in bots})


@pytest.fixture(scope="module")
def models():
    return {"production": _model(0), "same": _model(0), "other": _model(1)}


def _queries(n: int, agent: str = "bot") -> list[Query]:
    return [Query.of(agent, "trade?", {"rsi": float(i)}, f"d-{agent}-{i}") for i in range(n)]


def test_the_same_model_in_shadow_agrees_and_gives_the_served_probability(models):
    qs = _queries(20)
    made = decide(models["production"], qs, Exploration(), "1")
    rows = shadow(models["same"], qs, made, Exploration(), "2")
    assert [r["outcome"] for r in rows] == ["scored"] * 20
    assert all(r["agrees"] for r in rows)
    for r, d in zip(rows, made, strict=True):
        assert r["logged_probability"] == pytest.approx(d.record["probability"])
        assert r["action"] == d.record["action"]  # the same id draws the same action
        assert r["challenger_version"] == "2" and r["production_version"] == "1"
        assert sum(c["probability"] for c in r["ranking"]) == pytest.approx(1.0)


def test_a_challenger_that_does_not_know_the_agent_errs_for_those_requests_alone(models):
    qs = _queries(3) + _queries(2, agent="new_bot")
    both = _model(0, bots=("bot", "new_bot"))
    made = decide(both, qs, Exploration(), "1")
    rows = shadow(models["other"], qs, made, Exploration(), "2")
    assert [r["outcome"] for r in rows] == ["scored"] * 3 + ["error"] * 2
    assert "unknown agent 'new_bot'" in rows[3]["reason"]


class Log:
    enabled = True

    def __init__(self):
        self.records: list[dict] = []

    def put(self, records):
        self.records += records

    def status(self):
        return {"logging": True}


def _follower(model, version="2", alias="2", last=None):
    served = Served(version, "run", model, "now") if model is not None else None
    status = ReloadStatus(alias_version=alias, last_outcome=last)
    return SimpleNamespace(served=served, status=status)


class Clock:
    def __init__(self):
        self.t, self.tick = 0.0, 0.0  # each reading advances it by `tick`

    def __call__(self):
        self.t += self.tick
        return self.t - self.tick


def test_pending_decisions_are_scored_in_spare_time_and_never_before(models):
    log = Log()
    sh = Shadow(_follower(models["other"]), log, Exploration())
    qs = _queries(20)
    made = decide(models["production"], qs, Exploration(), "1")
    sh.offer(qs, made)
    assert log.records == [] and sh.waiting == 20  # nothing done on the request's path
    assert len(sh.pending) == 3  # pieces of at most 8 decisions
    while sh.step(idle=True):
        pass
    assert [r["outcome"] for r in log.records] == ["scored"] * 20
    assert all(r["scoring_ms"] >= 0 for r in log.records)
    assert sh.counts["scored"] == 20 and sh.waiting == 0 and not sh.has_work()


def test_while_the_worker_is_busy_the_shadow_keeps_to_its_budget_and_logs_what_it_skips(
    models,
):
    log, clock = Log(), Clock()
    follower = _follower(models["other"])
    sh = Shadow(follower, log, Exploration(), budget=0.1, max_pending=8, clock=clock)
    qs = _queries(4)
    made = decide(models["production"], qs, Exploration(), "1")
    sh.offer(qs, made)
    assert not sh.step(idle=False)  # busy, no time saved up yet: nothing scored
    assert log.records == [] and sh.waiting == 4
    for _ in range(2):  # more batches: the oldest are dropped past max_pending
        sh.offer(qs, made)
    assert sh.waiting == 8 and sh.counts["skipped"] == 4
    assert log.records == []  # counted, written as one row a second
    clock.t, clock.tick = 0.1, 0.01  # 0.1 s busy: 10 ms of shadow time earned
    assert sh.step(idle=False) and sh.counts["scored"] == 4
    assert log.records[0]["outcome"] == "scored"  # the tally is not due yet
    assert not sh.step(idle=False)  # that piece took more than 10 ms: the credit is spent
    assert sh.step(idle=True) and sh.counts["scored"] == 8  # idle: free


def test_skipped_decisions_are_one_row_per_bot_and_reason_a_second_that_counts_them(models):
    log, clock = Log(), Clock()
    sh = Shadow(_follower(models["other"]), log, Exploration(), max_pending=4, clock=clock)
    qs = _queries(6) + _queries(3, agent="other_bot")
    made = decide(_model(0, bots=("bot", "other_bot")), qs, Exploration(), "1")
    for _ in range(3):
        sh.offer(qs, made)  # 27 taken up, at most 4 may wait (whole pieces go)
    skipped = sh.counts["skipped"]
    assert skipped + sh.waiting == 27 and sh.waiting <= 4 and log.records == []
    clock.t = 1.5  # a second on: the next step writes the tally
    sh.step(idle=True)
    rows = [r for r in log.records if r["outcome"] == "skipped"]
    assert sum(r["decisions"] for r in rows) == skipped
    assert {r["bot"] for r in rows} == {"bot", "other_bot"} and len(rows) == 2
    assert all(r["decision_id"].startswith("skipped:") for r in rows)
    assert all("time budget" in r["reason"] and r["production_version"] == "1" for r in rows)
    assert all(r["decisions"] == 1 for r in log.records if r["outcome"] == "scored")
    sh.offer(qs, made)
    sh.close()  # a worker stopping writes what it has counted
    assert (
        sum(r["decisions"] for r in log.records if r["outcome"] == "skipped")
        == sh.counts["skipped"]
    )
    rep = summarise(
        [r | {"probability": None, "reward": None, "decide_ms": None} for r in log.records],
        GateSpec(ope_bootstrap=10),
        "1",
    )
    assert rep["counts"] == sh.counts and rep["decisions"] == sum(sh.counts.values())
    assert rep["rows"] == len(log.records) < rep["decisions"]


def test_a_challenger_that_raises_or_is_missing_is_counted_never_raised(models):
    class Broken:
        def knows(self, bot):
            return True

        def rank_many(self, *a, **k):
            raise RuntimeError("boom")

    log = Log()
    sh = Shadow(_follower(Broken()), log, Exploration())
    qs = _queries(3)
    made = decide(models["production"], qs, Exploration(), "1")
    sh.offer(qs, made)
    sh.step(idle=True)
    assert sh.counts["error"] == 3 and "RuntimeError: boom" in log.records[0]["reason"]

    last = {"version": "3", "outcome": "failed", "reason": "canary scores differ"}
    missing = Shadow(_follower(None, alias="3", last=last), Log(), Exploration())
    missing.offer(qs, made)
    assert missing.counts["missing"] == 3
    assert "canary" in missing.log.records[0]["reason"]
    assert missing.status()["state"] == "failed"

    off = Shadow(_follower(None, alias=None), Log(), Exploration())
    off.offer(qs, made)
    assert off.log.records == [] and off.status()["state"] == "off"


def test_the_share_is_drawn_from_the_decision_id():
    ids = [f"id-{i}" for i in range(10_000)]
    taken = [sampled(i, 0.3) for i in ids]
    assert 0.28 < np.mean(taken) < 0.32
    assert taken == [sampled(i, 0.3) for i in ids]  # the same id, the same draw
    assert all(sampled(i, 1.0) for i in ids[:10])


def test_live_estimates_are_exact_where_they_can_be():
    # the logging policy against itself: no difference, every weight 1
    r = np.array([0.0, 1.0, 0.5, 0.2])
    same = live_estimates(r, [0.5] * 4, [0.5] * 4, r, [0.4] * 4, [0.4] * 4, n_boot=50)
    for key in ("ips", "snips", "dr"):
        assert same[key]["diff"] == pytest.approx(0.0)
    assert same["ess"] == pytest.approx(4.0)
    # two actions logged half and half; the target always takes action 0 (reward 1)
    mu = [0.5] * 4
    pi = [1.0, 0.0, 1.0, 0.0]  # the logged actions: 0, 1, 0, 1
    r = np.array([1.0, 0.0, 1.0, 0.0])
    q = [0.0] * 4
    est = live_estimates(r, mu, pi, q, [0.0] * 4, [0.0] * 4, n_boot=50)
    assert est["ips"]["challenger"] == pytest.approx(1.0)
    assert est["ips"]["diff"] == pytest.approx(0.5)
    assert est["dr"]["diff"] == pytest.approx(0.5)  # a zero reward model: DR is IPS


def test_the_live_dr_interval_covers_the_true_difference():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    x = rng.random(n)
    true = np.stack([x * (j - 1.5) / 2 + 0.1 * j for j in range(k)], 1)  # E[r | x, a]
    q = true + rng.normal(0, 0.1, (n, k))  # an imperfect reward model
    mu = np.full((n, k), 0.1 / k) + np.eye(k)[np.zeros(n, int)] * 0.9  # greedy on action 0
    pi = np.full((n, k), 0.1 / k) + np.eye(k)[true.argmax(1)] * 0.9  # greedy on the best
    logged = np.array([rng.choice(k, p=p) for p in mu])
    rows = np.arange(n)
    r = true[rows, logged] + rng.normal(0, 0.3, n)
    est = live_estimates(
        r,
        mu[rows, logged],
        pi[rows, logged],
        q[rows, logged],
        (pi * q).sum(1),
        (mu * q).sum(1),
        n_boot=300,
    )
    truth = float(((pi - mu) * true).sum(1).mean())
    low, high = est["dr"]["ci"]
    assert low <= truth <= high and high - low < 0.15


def _row(i, reward, agrees=True, p_logged=0.5, p_challenger=0.5, bot="bot"):
    a, b = {"action": "buy"}, {"action": "sell"}
    ranking = [
        {"action": a, "expected_reward": 0.5, "probability": p_logged},
        {"action": b, "expected_reward": 0.1, "probability": 1 - p_logged},
    ]
    mine = [
        {"action": a, "expected_reward": 0.4, "probability": p_challenger},
        {"action": b, "expected_reward": 0.2, "probability": 1 - p_challenger},
    ]
    return {
        "decision_id": f"d{i}",
        "bot": bot,
        "production_version": "1",
        "outcome": "scored",
        "reason": None,
        "agrees": agrees,
        "logged_probability": p_challenger,
        "shadow_ranking": json.dumps(mine),
        "scoring_ms": 0.5,
        "probability": p_logged,
        "action": json.dumps(a),
        "ranking": json.dumps(ranking),
        "reward": reward,
        "decide_ms": 1.0,
    }


def _verdict(rows, **spec):
    rep = summarise(rows, GateSpec(ope_bootstrap=100, **spec), "1")
    return judge(rep | {"version": "2", "production": "1"}, GateSpec(**spec)), rep


def test_the_verdict_waits_promotes_or_rejects_on_the_evidence():
    assert _verdict([])[0].outcome == WAIT
    no_reward = [_row(i, None) for i in range(200)]
    assert "no decision scored in shadow has a reward" in _verdict(no_reward)[0].reason
    few = [_row(i, float(i % 2)) for i in range(40)]
    assert "too little evidence" in _verdict(few)[0].reason
    same = [_row(i, float(i % 2)) for i in range(300)]
    verdict, rep = _verdict(same)
    assert verdict.outcome == PROMOTE and rep["agreement"] == 1.0
    assert rep["counts"]["scored"] == 300 and rep["with_reward"] == 300
    # the Challenger would take the served action (reward 0) far more often: worse
    worse = [_row(i, 0.0, p_logged=0.5, p_challenger=0.9) for i in range(150)]
    worse += [_row(i + 150, 1.0, p_logged=0.5, p_challenger=0.1) for i in range(150)]
    verdict, rep = _verdict(worse)
    assert verdict.outcome == REJECT and rep["value"]["dr"]["diff"] < 0
    # shown worse on little evidence: taken off all the same (the safe direction)
    verdict, rep = _verdict(worse[:30] + worse[150:180])
    assert rep["value"]["ess"] < 100 and verdict.outcome == REJECT
