"""Served decisions, end to end: the real agent server, a PostgreSQL of the module's own
(embedded, so that it can be stopped), the MLflow registry and the export.

Execute answers are decisions with a probability, the same from `valifi serve` and
from `mlflow models serve` of the same version; every one is logged to
`agent_decisions` once, also while the database is down for 30 s under load;
rewards come back by `POST /reward` or by a bot's row naming the decision, once
each; the export joins them after the reward wait.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from core.registry import Registry
from flows.export import ExportSpec, export_snapshot
from model.config import Exploration
from model.decision import replay
from model.snapshot import Manifest, read_rows
from model.synthetic import World
from tests.helpers import (
    ROOT,
    free_port,
    mlflow_serve_command,
    register_small,
    start_server,
    stop_server,
)
from valifi.experiments import with_venv_path
from valifi.seed import seed

pytestmark = pytest.mark.e2e

MODEL = "valifi-agent-decisions"
EXECUTE = {
    "task": "Find a trade setup for NVDA",
    "agent_type": "trading_advanced",
    "query_type": "execute",
    "context": {"symbol": "NVDA", "indicators": {"rsi": 72.0, "volatility": 0.3}},
}


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """A PostgreSQL of this module's own, to stop and start again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    folder = tmp_path_factory.mktemp("decisions-pg")
    server = pgserver.get_server(folder, cleanup_mode="stop")
    url = server.get_uri()
    seed(url, 600, world=World(seed=8), days=6)  # the bots' own table beside the log
    yield {"url": url, "folder": folder}
    server.cleanup()
    _stop_postgres(folder)  # the one started again after the outage, if it still runs


@pytest.fixture(scope="module")
def server(stack_env, pg, tmp_path_factory):
    uri = stack_env["MLFLOW_TRACKING_URI"]
    version = register_small(uri, MODEL, tmp_path_factory.mktemp("decisions"), seed=6)
    Registry(uri, MODEL).promote(version, "decision tests")
    port = free_port()
    proc = start_server(
        port,
        {
            "VALIFI_MODEL_NAME": MODEL,
            "DATABASE_URL": pg["url"],
            "VALIFI_SERVE_LOG_RETRY_S": "1",
        },
    )
    yield f"http://127.0.0.1:{port}", version
    stop_server(proc)


REQUESTS = [
    {
        "agent_type": "trading_advanced",
        "task": "Analyze AAPL stock and suggest trade",
        "context": {"symbol": "AAPL", "indicators": {"rsi": 27.5, "volatility": 0.2}},
    },
    {
        "agent_type": "trading_advanced",
        "task": "Analyze AAPL stock and suggest trade",
        "context": {
            "symbol": "AAPL",
            "indicators": {"rsi": 27.5, "volatility": 0.2},
            "data_type": "strategy_result",
        },
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
            "data_type": "user_feedback",
            "candidates": [
                {"action": "rebalance"},
                {"action": "hedge"},
                {"action": "buy_bonds", "share": 0.2},
            ],
        },
    },
]


@pytest.fixture(scope="module")
def mlflow_server(server):
    """`mlflow models serve` of the version the agent server serves."""
    port = free_port()
    proc = subprocess.Popen(
        mlflow_serve_command(MODEL, port),
        cwd=ROOT,
        env=with_venv_path(dict(os.environ)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/ping", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


def _wait(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the server exited"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer")


def test_both_servers_give_the_same_answer_to_the_same_requests(server, mlflow_server):
    ours, version = server
    theirs = mlflow_server
    # the same decision ids: the same draws (new ids would draw afresh on each server)
    requests = [r | {"decision_id": f"same-answer-{i}"} for i, r in enumerate(REQUESTS)]
    mine = [
        httpx.post(f"{ours}/predict", json={**r, "query_type": "execute"}, timeout=30)
        for r in requests
    ]
    assert all(r.status_code == 200 for r in mine), [r.text for r in mine]
    r = httpx.post(f"{theirs}/invocations", json={"dataframe_records": requests}, timeout=60)
    assert r.status_code == 200, r.text
    for a, b in zip([m.json() for m in mine], r.json()["predictions"], strict=True):
        assert a.pop("model_version") == version
        # all of the answer; scores to 1e-5 (a batch of other size sums in another order,
        # and a prefix network scores many pairs apart, a few joined)
        assert _close(a, b), json.dumps([a, b])
    with_type, without = mine[1].json()["result"], mine[0].json()["result"]
    assert with_type != without  # the data type is part of what is scored
    assert len(without["runners_up"]) == 3  # the bank's four actions
    assert mine[3].json()["result"]["candidates"] == "context"


def _close(a, b, tol: float = 1e-5) -> bool:
    """The same document, but for numbers that differ by no more than `tol` (rounding
    both to a number of places would tell apart two that straddle a rounding edge)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return a == b


def _logged(url: str, ids: list[str] | None = None) -> dict[str, dict]:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT id, bot, data_type, input, candidates, action, probability, explored, "
            "ranking, model_version, exploration, reward, reward_source FROM agent_decisions"
        )
        names = [d.name for d in cur.description]
        rows = {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}
    return rows if ids is None else {i: rows[i] for i in ids if i in rows}


def _wait_logged(url: str, ids: list[str], timeout: float = 30) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while len(got := _logged(url, ids)) < len(set(ids)):
        assert time.monotonic() < deadline, f"{len(got)} of {len(set(ids))} logged"
        time.sleep(0.2)
    return got


def test_an_execute_answer_is_a_decision_logged_once_and_replayable(server, pg):
    url, version = server
    # ids of the test's own: the draws are the same on every run (two of these explore)
    answers = [
        httpx.post(
            f"{url}/predict", json=EXECUTE | {"decision_id": f"decision-test-{i}"}, timeout=30
        ).json()
        for i in range(40)
    ]
    for a in answers:
        assert a["model_version"] == version and 0 < a["probability"] <= 1
        assert isinstance(a["explored"], bool)
    assert uuid.UUID(httpx.post(f"{url}/predict", json=EXECUTE, timeout=30).json()["decision_id"])
    assert any(a["explored"] for a in answers) and not all(a["explored"] for a in answers)
    # a client's own id: a retry gets the same answer and is logged once
    mine = EXECUTE | {"decision_id": "bot-7:order-1"}
    first, again = (httpx.post(f"{url}/predict", json=mine, timeout=30).json() for _ in range(2))
    assert first == again and first["decision_id"] == "bot-7:order-1"
    info = httpx.post(f"{url}/predict", json={"task": "What is Valifi?"}, timeout=30).json()
    assert "decision_id" not in info  # not a decision, not logged
    ids = [a["decision_id"] for a in answers] + ["bot-7:order-1"]
    logged = _wait_logged(pg["url"], ids)
    with psycopg.connect(pg["url"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM agent_decisions WHERE id = 'bot-7:order-1'")
        assert cur.fetchone()[0] == 1
    for a in answers:
        row = logged[a["decision_id"]]
        assert row["action"] == a["result"]["action"] and row["model_version"] == version
        assert row["probability"] == pytest.approx(a["probability"], abs=1e-6)
        assert row["exploration"]["epsilon"] == Exploration().epsilon
        assert row["input"]["task"] == EXECUTE["task"]
        probs, k = replay(row)  # the logged scores and settings give the same
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        assert probs == pytest.approx([r["probability"] for r in row["ranking"]], abs=1e-9)
        assert row["ranking"][k]["action"] == row["action"] and row["explored"] == (k != 0)
    status = httpx.get(f"{url}/status", timeout=10).json()
    assert status["decisions"].startswith("logged (")


def test_a_reward_is_recorded_once_per_decision(server, pg):
    url, _ = server
    answer = httpx.post(f"{url}/predict", json=EXECUTE, timeout=30).json()
    did = answer["decision_id"]
    _wait_logged(pg["url"], [did])

    def reward(body):
        return httpx.post(f"{url}/reward", json=body, timeout=30)

    first = reward({"decision_id": did, "reward": 0.25})
    assert first.status_code == 200 and first.json()["status"] == "recorded"
    retry = reward({"decision_id": did, "reward": 0.25})  # a retried POST
    assert retry.status_code == 200 and retry.json()["status"] == "already recorded"
    other = reward({"decision_id": did, "reward": -0.5})
    assert other.status_code == 409 and "recorded once" in other.json()["error"]
    assert reward({"decision_id": "no-such-decision", "reward": 0.1}).status_code == 404
    for bad in ({"decision_id": did, "reward": 5.0}, {"decision_id": did, "reward": "high"}):
        r = reward(bad)
        assert r.status_code == 422 and r.json()["error"]
    assert _logged(pg["url"], [did])[did]["reward"] == 0.25


def test_the_export_joins_rewards_after_the_wait_never_twice(server, pg):
    url, _ = server
    made = [httpx.post(f"{url}/predict", json=EXECUTE, timeout=30).json() for _ in range(5)]
    ids = [m["decision_id"] for m in made]
    _wait_logged(pg["url"], ids)
    api, bot_row, both, late, _ = ids
    now = datetime.now(UTC)
    for did, value, at in (
        (api, 0.5, None),
        (both, 0.75, None),
        (late, 0.1, now + timedelta(hours=3)),
    ):
        body = {"decision_id": did, "reward": value} | ({"at": at.isoformat()} if at else {})
        assert httpx.post(f"{url}/reward", json=body, timeout=30).status_code == 200
    with psycopg.connect(pg["url"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM trading_bots WHERE name = 'trading_advanced' LIMIT 1")
        bot_id = cur.fetchone()[0]
        for did, value in ((bot_row, -0.25), (both, -1.0)):  # the bots' own rows name them
            cur.execute(
                "INSERT INTO bot_training_data (id, bot_id, data_type, input, actual_output, "
                "reward, created_at) VALUES (%s, %s, 'market_data', %s, %s, %s, now())",
                (
                    f"row-{did}",
                    bot_id,
                    json.dumps({"task": "x"}),
                    json.dumps({"decision_id": did}),
                    value,
                ),
            )
    # the reward wait has passed for all of them: two hours later, with a one-hour wait
    snap = export_snapshot(
        pg["url"],
        ExportSpec(until=now + timedelta(hours=2), reward_wait_s=3600),
        pg["folder"] / "snaps",
    )
    m = Manifest.read(snap)
    d = m.decisions
    assert d["waiting"] == 0 and d["bot_rows_naming_them"] == 2
    df = read_rows(snap)
    mine = df[df["id"].isin(ids)].set_index("id")
    assert set(mine.index) == {api, bot_row, both}  # late and none: left out
    assert mine.loc[api, "reward"] == 0.5 and mine.loc[bot_row, "reward"] == -0.25
    assert mine.loc[both, "reward"] == 0.75  # the API's, once: the bot row is not its own row
    assert not df["id"].astype(str).str.startswith("row-").any()
    for did, m_ in zip(ids[:3], made[:3], strict=True):
        assert mine.loc[did, "propensity"] == pytest.approx(m_["probability"], abs=1e-6)
        assert json.loads(mine.loc[did, "decision"])["model_version"] == m_["model_version"]
    assert d["late_rewards"] >= 1 and d["without_reward"] >= 2
    assert d["joined"] == d["from_api"] + d["from_bot_rows"]
    # within the wait nothing is trained on yet: every decision waits
    early = export_snapshot(pg["url"], ExportSpec(reward_wait_s=3600), pg["folder"] / "snaps")
    e = Manifest.read(early).decisions
    assert e["waiting"] == e["logged"] and e["joined"] == 0
    assert not read_rows(early)["id"].isin(ids).any()


def test_the_database_down_for_30_s_under_load_fails_nothing_and_loses_nothing(server, pg):
    """Decisions made while PostgreSQL is stopped go to the spool and are written when it
    returns: afterwards every answered decision is in the table, exactly once."""
    url, _ = server
    answered: list[str] = []
    failed: list = []
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{url}/predict", json=EXECUTE)
                    (answered if r.status_code == 200 else failed).append(
                        r.json()["decision_id"] if r.status_code == 200 else r.text
                    )
                except httpx.HTTPError as exc:
                    failed.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        _stop_postgres(pg["folder"])
        down_at = time.monotonic()
        _wait_status(url, "spooled to disk", 30)
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        _start_postgres(pg["folder"])  # back
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failed == []
    assert len(answered) > 100
    logged = _wait_logged(pg["url"], answered, timeout=60)
    assert len(logged) == len(set(answered)) == len(answered)
    _wait_status(url, "logged (", 30)


def _stop_postgres(folder) -> None:
    import signal

    import psutil

    from valifi.stack import _pgserver

    info = _pgserver().utils.PostmasterInfo.read_from_pgdata(folder)
    if info is None or not info.is_running():
        return
    proc = psutil.Process(info.pid)
    proc.send_signal(signal.SIGINT)  # fast shutdown
    proc.wait(30)


def _start_postgres(folder) -> None:
    """Start the stopped server again, as `valifi stack up` does (a process of its own:
    this one's pgserver remembers the server it started as running)."""
    import subprocess
    import sys

    code = "import sys, pgserver; pgserver.get_server(sys.argv[1], cleanup_mode=None)"
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, timeout=60)


def _wait_status(url: str, prefix: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (got := httpx.get(f"{url}/status", timeout=10).json()["decisions"]).startswith(
        prefix
    ):
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
