"""The two servers the README offers give the same answer to the same request.

`valifi serve` (LitServe) and `mlflow models serve` of the same registered version,
side by side: execute requests with and without `context.data_type`, from the bank
and with `context.candidates`, get the same actions, scores and runners-up.
"""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from core.registry import Registry
from tests.helpers import (
    ROOT,
    free_port,
    mlflow_serve_command,
    register_small,
    start_server,
    stop_server,
)
from valifi.experiments import with_venv_path

pytestmark = pytest.mark.e2e

MODEL = "valifi-agent-same-answer"
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
def servers(stack_env, tmp_path_factory):
    uri = stack_env["MLFLOW_TRACKING_URI"]
    version = register_small(uri, MODEL, tmp_path_factory.mktemp("same"), seed=5)
    Registry(uri, MODEL).promote(version, "same answer from both servers")
    ours_port, mlflow_port = free_port(), free_port()
    ours = start_server(ours_port, {"VALIFI_MODEL_NAME": MODEL})
    theirs = subprocess.Popen(
        mlflow_serve_command(MODEL, mlflow_port),
        cwd=ROOT,
        env=with_venv_path(dict(os.environ)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(f"http://127.0.0.1:{mlflow_port}/ping", theirs)
        yield f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{mlflow_port}", version
    finally:
        stop_server(theirs)
        stop_server(ours)


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


def test_both_servers_give_the_same_answer_to_the_same_requests(servers):
    ours, theirs, version = servers
    mine = [
        httpx.post(f"{ours}/predict", json={**r, "query_type": "execute"}, timeout=30)
        for r in REQUESTS
    ]
    assert all(r.status_code == 200 for r in mine), [r.text for r in mine]
    r = httpx.post(f"{theirs}/invocations", json={"dataframe_records": REQUESTS}, timeout=60)
    assert r.status_code == 200, r.text
    for a, b in zip([m.json() for m in mine], r.json()["predictions"], strict=True):
        assert a.pop("model_version") == version
        assert a == b  # action, scores, runners-up, the sentence: all of it
    with_type, without = mine[1].json()["result"], mine[0].json()["result"]
    assert with_type != without  # the data type is part of what is scored
    assert len(without["runners_up"]) == 3  # the bank's four actions
    assert mine[3].json()["result"]["candidates"] == "context"
