"""The Challenger scored in shadow, end to end: the real agent server (2 workers), the
MLflow registry, a PostgreSQL database of the module's own, the `valifi` command and
the `train` flow on the Prefect server.

Production v1 serves throughout. Challengers: v2 (another training), v3 (weights
corrupted: refused at load), v4 (trained before `trading_advanced` existed: it cannot
rank that bot's requests), v5 (v1's own training registered again: the same policy).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime

import httpx
import psycopg
import pytest

from core.registry import Registry
from core.settings import CHALLENGER
from model.synthetic import World, write_snapshot
from tests.helpers import (
    ANY_MODEL,
    free_port,
    module_settings,
    register_small,
    run_summary,
    start_server,
    stop_server,
    train_small,
    valifi,
)
from valifi.experiments import register, train
from valifi.seed import seed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "valifi-agent-shadow"
POLL_S = 1.0
REQUESTS = [
    {
        "agent_type": "trading_advanced",
        "task": "Analyze AAPL stock and suggest trade",
        "context": {"symbol": "AAPL", "indicators": {"rsi": 27.5, "volatility": 0.2}},
    },
    {
        "agent_type": "financial_stocks",
        "task": "Should I invest in MSFT?",
        "context": {"fundamentals": {"pe_ratio": 12.0, "earnings_surprise": 0.09}},
    },
    {
        "agent_type": "analytics_portfolio",
        "task": "Review my portfolio risk",
        "context": {
            "candidates": [
                {"action": "rebalance"},
                {"action": "hedge"},
                {"action": "buy_bonds", "share": 0.2},
            ]
        },
    },
]


def _corrupt(artifact) -> None:
    from safetensors.torch import load_file, save_file

    weights = artifact / "model.safetensors"
    t = load_file(weights)
    key = next(k for k in t if k.startswith("head"))
    t[key] = t[key] - 1.0
    save_file(t, weights)


@pytest.fixture(scope="module")
def env(stack_env, external_pg, tmp_path_factory):
    values = {
        "VALIFI_MODEL_NAME": MODEL,
        "VALIFI_TRAIN_MAX_EPOCHS": "2",
        "VALIFI_GATE_AUC_MIN": "0",
        "VALIFI_GATE_RMSE_RATIO_MAX": "10",
    }
    with module_settings(external_pg, f"valifi_shadow_{os.getpid()}", values) as env:
        uri = stack_env["MLFLOW_TRACKING_URI"]
        root = tmp_path_factory.mktemp("shadow")
        assert register_small(uri, MODEL, root, 1) == "1"
        assert register_small(uri, MODEL, root, 2) == "2"
        assert register_small(uri, MODEL, root, 3, tamper=_corrupt) == "3"
        bots = tuple(b for b in World().bots if b != "trading_advanced")
        snap = write_snapshot(root / "snap-no-trading", 1500, World(seed=4, only=bots))
        out = train(snap, root / "out-no-trading", 4, "--max-epochs", "2")
        assert register(uri, MODEL, out, snap) == "4"
        snap1, out1 = train_small(root / "again", 1, extra=ANY_MODEL)  # v1's, as trained
        assert register(uri, MODEL, out1, snap1, key="shadow-v1-again") == "5"
        Registry(uri, MODEL).promote("1", "shadow tests")
        yield env | {"uri": uri}


@pytest.fixture(scope="module")
def server(env):
    port = free_port()
    proc = start_server(
        port,
        {
            "VALIFI_MODEL_NAME": MODEL,
            "DATABASE_URL": env["DATABASE_URL"],
            "VALIFI_SERVE_POLL_INTERVAL_S": str(POLL_S),
            "VALIFI_SERVE_LOG_FLUSH_S": "0.1",
        },
    )
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def _answers(url: str, ids: list[str]) -> list[dict]:
    with httpx.Client(timeout=30) as client:
        out = []
        for body, i in zip(REQUESTS, ids, strict=True):
            r = client.post(
                f"{url}/predict", json=body | {"query_type": "execute"} | {"decision_id": i}
            )
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


def _status(url: str) -> dict:
    return httpx.get(f"{url}/status", timeout=10).json()


def _wait_shadow(url: str, state: str, version: str | None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = _status(url)
        docs = [w["shadow"] for w in st["workers"] if w["alive"]]
        if len(docs) == 2 and all(
            d["state"] == state and d["alias_version"] == version for d in docs
        ):
            return st
        assert time.monotonic() < deadline, json.dumps(st["shadow"])
        time.sleep(0.3)


def _set(uri: str, version: str | None) -> None:
    """Move the Challenger alias as the MLflow UI does (no load check, no audit)."""
    client = Registry(uri, MODEL).client
    if version is None:
        client.delete_registered_model_alias(MODEL, CHALLENGER)
    else:
        client.set_registered_model_alias(MODEL, CHALLENGER, version)


def _shadow_rows(db: str, ids: list[str]) -> dict[tuple[str, str], dict]:
    with psycopg.connect(db) as conn:
        if conn.execute("SELECT to_regclass('agent_shadow')").fetchone()[0] is None:
            return {}  # no shadow row written yet
        rows = conn.execute(
            "SELECT decision_id, challenger_version, outcome, reason, agrees, "
            "logged_probability FROM agent_shadow WHERE decision_id = ANY(%s)",
            (ids,),
        ).fetchall()
    names = ("outcome", "reason", "agrees", "p")
    return {(r[0], r[1]): dict(zip(names, r[2:], strict=True)) for r in rows}


def _wait_rows(db: str, ids: list[str], version: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = {k[0]: v for k, v in _shadow_rows(db, ids).items() if k[1] == version}
        if len(rows) == len(ids):
            return rows
        assert time.monotonic() < deadline, f"shadow rows of v{version}: {rows}"
        time.sleep(0.3)


def test_production_answers_the_same_whatever_the_challenger_and_status_tells(server, env):
    uri, db = env["uri"], env["DATABASE_URL"]
    ids = [f"same-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(REQUESTS))]
    st = _wait_shadow(server, "off", None)
    assert st["shadow"]["state"] == "off" and st["state"] == "ok"
    alone = _answers(server, ids)
    assert {a["model_version"] for a in alone} == {"1"}

    _set(uri, "2")  # another model in shadow: scored, answers untouched
    st = _wait_shadow(server, "scoring", "2")
    assert st["state"] == "ok" and st["shadow"]["state"] == "scoring"
    assert _answers(server, ids) == alone
    told = httpx.post(f"{server}/predict", json={"task": "What is the system status?"}).json()
    assert "Challenger v2 in shadow: scoring" in told["answer"]
    scored = _wait_rows(db, ids, "2")
    assert {r["outcome"] for r in scored.values()} == {"scored"}
    assert all(0 <= r["p"] <= 1 for r in scored.values())

    _set(uri, "3")  # a corrupt artifact: refused, reported, Production untouched
    st = _wait_shadow(server, "failed", "3")
    assert st["state"] == "ok" and st["problems"] == []
    assert "canary" in st["shadow"]["summary"]
    assert _answers(server, ids) == alone
    missing = _wait_rows(db, ids, "3")
    assert {r["outcome"] for r in missing.values()} == {"missing"}
    assert all("canary" in r["reason"] for r in missing.values())

    _set(uri, "4")  # cannot rank trading_advanced: counted as errors, never raised
    st = _wait_shadow(server, "scoring", "4")
    assert _answers(server, ids) == alone
    rows = _wait_rows(db, ids, "4")
    assert rows[ids[0]]["outcome"] == "error" and "unknown agent" in rows[ids[0]]["reason"]
    assert rows[ids[1]]["outcome"] == rows[ids[2]]["outcome"] == "scored"
    deadline = time.monotonic() + 10  # the workers' status is written after each poll
    while _status(server)["shadow"]["error"] < 1:
        assert time.monotonic() < deadline, _status(server)["shadow"]
        time.sleep(0.3)

    _set(uri, None)  # removed: the shadow stops
    st = _wait_shadow(server, "off", None)
    assert st["shadow"]["state"] == "off" and st["state"] == "ok"
    assert _answers(server, ids) == alone
    time.sleep(1)
    assert not [k for k in _shadow_rows(db, ids) if k[1] not in ("2", "3", "4")]


class Load:
    def __init__(self, url: str, threads: int = 4):
        self.url, self.stop = url, threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                body = REQUESTS[i % len(REQUESTS)] | {"query_type": "execute"}
                i += 1
                try:
                    self.statuses.append(client.post(f"{self.url}/predict", json=body).status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _counts(db: str, version: str, since: datetime) -> dict[str, int]:
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT outcome, sum(decisions)::int FROM agent_shadow WHERE challenger_version = %s "
            "AND created_at >= %s GROUP BY outcome",
            (version, since),
        ).fetchall()
    return dict(rows)


def test_moving_the_challenger_under_load_fails_nothing_and_the_report_counts_the_rows(server, env):
    uri, db = env["uri"], env["DATABASE_URL"]
    since = datetime.now(UTC)
    with Load(server) as load:
        for version in ("2", "4", "2", None, "4", "2"):
            _set(uri, version)
            time.sleep(1.5)
    assert len(load.statuses) > 50
    assert set(load.statuses) == {200}
    _set(uri, None)
    _wait_shadow(server, "off", None)
    _wait_settled(db, ("2", "4"), since)  # what was pending is logged, then nothing more
    for version in ("2", "4"):
        r = valifi(
            "shadow",
            "report",
            "--version",
            version,
            "--since",
            since.isoformat(),
            "--json",
            env={"DATABASE_URL": db, "VALIFI_MODEL_NAME": MODEL},
        )
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        logged = _counts(db, version, since)
        assert sum(logged.values()) > 0
        assert rep["decisions"] == sum(logged.values())
        assert {k: v for k, v in rep["counts"].items() if v} == logged


def _wait_settled(db: str, versions, since: datetime, quiet_s: float = 1.0) -> None:
    """Until no shadow row of `versions` has come for `quiet_s` (30 s at most)."""
    deadline = time.monotonic() + 30
    last = None
    while (now := [_counts(db, v, since) for v in versions]) != last:
        assert time.monotonic() < deadline, f"shadow rows still coming: {now}"
        last = now
        time.sleep(quiet_s)


def _post_rewards(url: str, n: int) -> list[str]:
    """`n` execute decisions, each with a reward (0, 0.2, .. 0.8 in turn)."""
    ids = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            body = REQUESTS[i % len(REQUESTS)] | {"query_type": "execute"}
            answer = client.post(f"{url}/predict", json=body).json()
            ids.append(answer["decision_id"])
            reward = (i % 5) / 5
            for _ in range(100):
                r = client.post(
                    f"{url}/reward", json={"decision_id": answer["decision_id"], "reward": reward}
                )
                if r.status_code != 404:  # still on its way to the log
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
    return ids


def test_promote_from_shadow_moves_production_only_on_enough_live_evidence(server, env):
    uri, db = env["uri"], env["DATABASE_URL"]
    registry = Registry(uri, MODEL)
    cmd_env = {"DATABASE_URL": db, "VALIFI_MODEL_NAME": MODEL}
    r = valifi("shadow", "start", "5", "--reason", "v1's training again", env=cmd_env)
    assert r.returncode == 0, r.stderr
    _wait_shadow(server, "scoring", "5")
    ids = _post_rewards(server, 30)
    _wait_rows(db, ids, "5")
    r = valifi("promote", "--from-shadow", env=cmd_env)  # too little evidence yet
    assert r.returncode == 1
    assert "too little evidence" in r.stdout and "Production stays v1" in r.stderr
    assert registry.champion().version == "1" and registry.challenger().version == "5"

    ids = _post_rewards(server, 120)
    _wait_rows(db, ids, "5")
    r = valifi("promote", "--from-shadow", env=cmd_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "non-inferior" in r.stdout
    assert "first choice the same as Production's: 100.0%" in r.stdout
    assert registry.champion().version == "5" and registry.challenger() is None
    moves = registry.audit(alias=CHALLENGER)
    assert [m["action"] for m in moves[-2:]] == ["shadow", "clear"]
    assert registry.audit()[-1]["to"] == "5" and "from the shadow" in registry.audit()[-1]["why"]
    # the workers swap to v5 at once: it is loaded already (the Challenger's model)
    deadline = time.monotonic() + 30
    while _status(server)["versions"] != ["5"]:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    Registry(uri, MODEL).promote("1", "shadow tests: back to v1")


def test_a_run_with_promote_via_shadow_puts_its_model_on_the_challenger(server, env, monkeypatch):
    from flows.pipeline import train as train_flow

    registry = Registry(env["uri"], MODEL)
    seed(env["DATABASE_URL"], 1500, world=World(seed=9), days=6)
    monkeypatch.setenv("VALIFI_GATE_PROMOTE_VIA", "shadow")
    monkeypatch.setenv("VALIFI_GATE_MARGIN", "10")  # the run is tested, not the model
    state = train_flow(return_state=True)
    assert state.name == "Challenger", state.message
    version = registry.challenger().version
    assert int(version) > 5 and registry.champion().version == "1"
    assert f"v{version} passed the gate and is scored in shadow" in state.message
    _wait_shadow(server, "scoring", version)
    # the next run settles it first: no live evidence yet, so it stays and says why
    monkeypatch.setenv("VALIFI_EXPORT_MIN_ROWS", "1000000")  # then skip the training
    state = train_flow(return_state=True)
    assert state.name == "Skipped", state.message
    assert registry.challenger().version == version and registry.champion().version == "1"
    summary = run_summary(state)  # the run summary's section on the Challenger
    assert f"## Shadow\nChallenger v{version} in shadow beside Production v1" in summary
    assert "**wait**: no decision scored in shadow has a reward yet" in summary
    _set(env["uri"], None)


def test_with_promote_via_shadow_a_first_model_still_goes_to_production(env, monkeypatch):
    """Nothing serves yet, so nothing could score it in shadow: it serves at once."""
    from flows.pipeline import train as train_flow

    first = f"{MODEL}-first"
    monkeypatch.setenv("VALIFI_MODEL_NAME", first)
    monkeypatch.setenv("VALIFI_GATE_PROMOTE_VIA", "shadow")
    state = train_flow(return_state=True)
    assert state.name == "Completed" and "promoted v1" in state.message, state.message
    registry = Registry(env["uri"], first)
    assert registry.champion().version == "1" and registry.challenger() is None
