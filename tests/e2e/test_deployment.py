"""train/nightly as users run it: `valifi deploy`, a real worker, `prefect deployment run`,
the real agent server, the run summary, and the automatic rollback after a promotion."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from model.synthetic import World
from tests.helpers import (
    ROOT,
    free_port,
    module_settings,
    register_small,
    start_server,
    stop_server,
    valifi,
)
from valifi.seed import seed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "valifi-agent-deploy-tests"
NOW = datetime.now(UTC).replace(tzinfo=None, microsecond=0)


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Hook.received.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    """A local receiver standing in for a chat or paging webhook."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.received
    server.shutdown()


@pytest.fixture(scope="module")
def env(stack_env, external_pg, webhook):
    port = free_port()
    values = {
        "VALIFI_NOTIFY_WEBHOOK_URL": webhook[0],
        "VALIFI_MODEL_NAME": MODEL,
        "VALIFI_TRAIN_MAX_EPOCHS": "8",
        "VALIFI_TRAIN_SYNTHETIC_GROUND_TRUTH": "true",
        "PYTHON_AGENT_URL": f"http://127.0.0.1:{port}",
        "VALIFI_SERVE_POLL_INTERVAL_S": "1",
        "VALIFI_WATCH_WINDOW_S": "3",
        "VALIFI_WATCH_POLL_S": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "VALIFI_WORKER_POLL_S": "1",
    }
    with module_settings(external_pg, f"valifi_deploy_{os.getpid()}", values) as env:
        seed(env["DATABASE_URL"], 4000, world=World(seed=1), end=NOW, days=6)
        yield env | {"port": port}


@pytest.fixture(scope="module")
def deployed(env):
    r = valifi("deploy", env={})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deployment train/nightly" in r.stdout
    assert "automation valifi-train-notifications" in r.stdout
    return r.stdout


@pytest.fixture(scope="module")
def worker(deployed, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "valifi.cli", "worker"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield proc
    stop_server(proc)
    log.close()


@pytest.fixture(scope="module")
def server(env):
    proc = start_server(env["port"], {})
    yield f"http://127.0.0.1:{env['port']}"
    stop_server(proc)


def _client_call(fn):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


def test_deployment_has_the_nightly_schedule_and_one_run_at_a_time(deployed):
    dep = _client_call(lambda c: c.read_deployment_by_name("train/nightly"))
    crons = [s.schedule.cron for s in dep.schedules]
    assert crons == ["0 2 * * *"]
    assert dep.schedules[0].schedule.timezone == "UTC" and dep.schedules[0].active
    assert dep.work_pool_name == "valifi-process"
    assert dep.global_concurrency_limit is not None
    assert dep.global_concurrency_limit.limit == 1
    assert str(dep.concurrency_options.collision_strategy).endswith("ENQUEUE")
    again = valifi("deploy", env={})  # updates in place
    assert again.returncode == 0, again.stderr
    assert _client_call(lambda c: c.read_deployment_by_name("train/nightly")).id == dep.id


def _run_deployment() -> str:
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "train/nightly"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return next(line.split()[-1] for line in r.stdout.splitlines() if "UUID" in line)


def _wait_final(run_id: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _client_call(lambda c: c.read_flow_run(run_id))
        if run.state and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish")


def test_prefect_deployment_run_trains_registers_promotes_and_serves(env, worker, server):
    from core.registry import Registry

    first = _run_deployment()
    second = _run_deployment()  # triggered while the first is pending or running
    # the worker may pick either up first; the one that ran first trains v1
    a, b = sorted((_wait_final(first), _wait_final(second)), key=lambda run: run.start_time)
    assert a.state.is_completed(), a.state.message
    assert a.state.message.startswith("promoted v1")
    # never concurrently: the second started after the first had finished
    assert b.start_time >= a.end_time, (a.start_time, a.end_time, b.start_time)
    assert b.state.is_completed(), b.state.message

    prod = Registry(os.environ["MLFLOW_TRACKING_URI"], MODEL).champion().version
    assert prod in ("1", "2")
    # the summary artifact of the run that went first
    arts = _client_call(lambda cl: cl.read_artifacts())
    mine = [x for x in arts if x.flow_run_id == a.id and x.key == "train-summary"]
    assert len(mine) == 1
    md = mine[0].data
    for part in (
        "## Snapshot",
        "## Validation",
        "## Training",
        "## Gate",
        "## Registry",
        f"{MODEL} v1",
        "promoted v1",
        "## After promotion",
        "| policy value, doubly robust |",
        "| effective sample size (matched rows) |",
        "Off-policy value: ",
    ):
        assert part in md, part
    # the second was judged against v1: the gate's off-policy comparison is in its summary
    theirs = [x for x in arts if x.flow_run_id == b.id and x.key == "train-summary"]
    assert "| doubly-robust value, challenger − champion |" in theirs[0].data
    # the server answers with the Production version
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(
            f"{server}/predict",
            json={"task": "Analyze AAPL stock and suggest trade", "agent_type": "trading_advanced"},
            timeout=30,
        )
        if r.status_code == 200 and r.json()["model_version"] == prod:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)


def _break_on_probe(artifact: Path) -> None:
    """Predictions raise for inputs with a `probe` number; the canary set has none."""
    fz = json.loads((artifact / "featurizer.json").read_text())
    fz["num_stats"]["in.probe"] = [0.0, 0.0]  # zero spread: division by zero at scoring
    (artifact / "featurizer.json").write_text(json.dumps(fz))


def test_a_version_failing_at_serving_time_is_rolled_back_with_the_reason(env, server, tmp_path):
    """`valifi promote --watch`: promoted by hand, watched as a nightly run watches, and
    moved back with the reason when it breaks on live traffic."""
    from core.registry import Registry

    uri = os.environ["MLFLOW_TRACKING_URI"]
    reg = Registry(uri, MODEL)
    if reg.champion() is None:  # (when this test runs alone)
        reg.promote(register_small(uri, MODEL, tmp_path, seed=2), "a good one")
    before = reg.champion().version
    bad = register_small(uri, MODEL, tmp_path, seed=3, tamper=_break_on_probe)

    stop = threading.Event()
    codes: list[tuple[int, str | None, bool]] = []

    def traffic():
        with httpx.Client(timeout=30) as h:
            i = 0
            while not stop.is_set():
                ctx = {"indicators": {"rsi": 40.0}} | ({"probe": 1.5} if i % 4 == 0 else {})
                r = h.post(
                    f"{server}/predict",
                    json={
                        "task": "Find a trade setup",
                        "agent_type": "trading_advanced",
                        "context": ctx,
                    },
                )
                codes.append((r.status_code, r.json().get("model_version"), "probe" in ctx))
                i += 1

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # the load check passes (the canaries have no `probe`); the traffic does not
        r = valifi(
            "promote",
            bad,
            "--reason",
            "a version that breaks on some inputs",
            "--watch",
            env={"VALIFI_WATCH_WINDOW_S": "60"},
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"rolled back to v{before}" in r.stdout and "error rate" in r.stdout
    assert reg.champion().version == before
    promote, last = reg.audit()[-2:]
    assert promote["action"] == "promote" and promote["to"] == bad
    assert last["action"] == "rollback" and last["to"] == before and last["from"] == bad
    assert last["why"].startswith(f"automatic rollback of v{bad}: error rate")
    assert last["by"] == promote["by"] and "@" in last["by"]  # who promoted by hand
    # only the probing requests failed, each on its own, naming the version that failed it
    failed = [(v, probe) for code, v, probe in codes if code == 500]
    assert failed and all(v == bad and probe for v, probe in failed)
    assert any(code == 200 and not probe for code, _, probe in codes)


def test_a_failed_run_sends_a_notification(env, worker, webhook):
    _, received = webhook
    before = len(received)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "deployment",
            "run",
            "train/nightly",
            "--param",
            'train_args=["--no-such-option"]',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    run_id = next(line.split()[-1] for line in r.stdout.splitlines() if "UUID" in line)
    run = _wait_final(run_id)
    assert run.state.is_failed() and "training failed" in run.state.message
    deadline = time.monotonic() + 90
    while len(received) == before:
        assert time.monotonic() < deadline, "no notification arrived"
        time.sleep(1)
    note = received[-1]
    assert "Failed" in note["subject"] and run.name in note["subject"]
    assert "training failed" in note["body"]
