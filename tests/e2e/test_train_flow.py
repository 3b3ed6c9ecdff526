"""The `train` flow end to end: real PostgreSQL, MLflow tracking server and Prefect server.

The tests of this module share one registered model (its own name) and run in
order: first run, second run, a deliberately worse model, invalid data, then
promote / rollback / a corrupted artifact / `mlflow models serve`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from model.synthetic import BOTS, BadRows, World
from tests.helpers import (
    ANY_MODEL,
    ROOT,
    free_port,
    mlflow_serve_command,
    module_settings,
    session_dir,
    valifi,
)
from valifi.seed import seed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "valifi-agent-flow-tests"
NOW = datetime.now(UTC).replace(tzinfo=None, microsecond=0)


@pytest.fixture(scope="module")
def env(stack_env, external_pg):
    """Settings of this module: its own database and model name, short training."""
    values = {
        "VALIFI_MODEL_NAME": MODEL,
        "VALIFI_TRAIN_MAX_EPOCHS": "8",
        "VALIFI_TRAIN_SYNTHETIC_GROUND_TRUTH": "true",
    }
    with module_settings(external_pg, f"valifi_flow_{os.getpid()}", values) as env:
        yield env


@pytest.fixture(scope="module")
def registry(stack_env):
    from core.registry import Registry

    return Registry(stack_env["MLFLOW_TRACKING_URI"], MODEL)


@pytest.fixture(scope="module")
def mlflow_client(registry):
    return registry.client


def _versions(c) -> list:
    from core.registry import Registry

    return Registry(os.environ["MLFLOW_TRACKING_URI"], MODEL).versions()


def _production(c) -> str | None:
    from core.registry import Registry

    mv = Registry(os.environ["MLFLOW_TRACKING_URI"], MODEL).champion()
    return mv.version if mv else None


# the gate, the registry and the nodes are what these runs test: any model does (the
# deployment's run, tests/e2e/test_deployment.py, trains with the defaults)
QUICK = list(ANY_MODEL)


def _run(**params):
    from flows.pipeline import train

    return train(return_state=True, **params)


def test_first_run_registers_v1_and_promotes_it(env, mlflow_client):
    seed(env["DATABASE_URL"], 4000, world=World(seed=1), end=NOW, days=6)
    state = _run(train_args=QUICK)
    assert state.is_completed() and state.name == "Completed", state.message
    assert state.message.startswith("promoted v1: ")
    assert "no champion: judged on floors alone" in state.message
    assert _production(mlflow_client) == "1"
    tags = mlflow_client.get_model_version(MODEL, "1").tags
    assert len(tags["snapshot_sha256"]) == 64 and int(tags["snapshot_rows"]) == 4000
    assert tags["window_since"] < tags["window_until"]
    assert tags["gate_decision"] == "pass" and "floors met" in tags["gate_reasons"]
    assert tags["git_commit"]
    assert json.loads(tags["config"])["model"]["d_model"] > 0
    run = mlflow_client.get_run(tags["mlflow_run_id"])
    assert run.data.metrics["auc"] > 0.6
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"data_docs", "tensorboard", "gate.json", "snapshot"} <= artifacts
    move = json.loads(tags["production.last_move"])
    assert move["to"] == "1" and move["from"] is None and move["by"].startswith("prefect:train/")


def test_second_run_compares_against_v1_with_recorded_reasons(env, mlflow_client):
    seed(env["DATABASE_URL"], 1500, world=World(seed=2), end=NOW, days=6, mode="append")
    state = _run(train_args=QUICK)
    assert state.is_completed(), state.message
    tags = mlflow_client.get_model_version(MODEL, "2").tags
    assert "v1: holdout MSE" in tags["gate_reasons"] and "95% CI" in tags["gate_reasons"]
    if tags["gate_decision"] == "pass":
        assert state.message.startswith("promoted v2") and _production(mlflow_client) == "2"
    else:
        assert state.name == "Rejected" and _production(mlflow_client) == "1"


def test_worse_model_is_registered_but_not_promoted(env, mlflow_client):
    before = _production(mlflow_client)
    state = _run(train_args=["--shuffle-rewards", *QUICK])
    assert state.is_completed() and state.name == "Rejected", state.message
    assert "rejected by the gate (v3 registered, not promoted)" in state.message
    assert "regresses against" in state.message or "below the floor" in state.message
    tags = mlflow_client.get_model_version(MODEL, "3").tags
    assert tags["gate_decision"] == "reject"
    assert _production(mlflow_client) == before


def test_a_promotion_made_while_a_run_is_evaluating_is_not_undone_by_that_run(env, registry):
    before = _production(None)
    count = len(registry.versions())
    other = next(v.version for v in registry.versions() if v.version != before)
    # a generous margin: this run's gate passes, so it reaches the promotion step
    proc = subprocess.Popen(
        [sys.executable, "-m", "valifi.cli", "train", "--", *QUICK],  # (passed on as they are)
        env={**os.environ, **env, "VALIFI_GATE_MARGIN": "1.0"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while len(registry.versions()) == count:  # registered; the load check comes next
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    registry.client.set_registered_model_alias(MODEL, "Production", other)  # by hand, meanwhile
    out, err = proc.communicate(timeout=300)
    new = registry.versions()[-1].version
    assert proc.returncode == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"Rejected: v{new} registered, not promoted: "), out
    assert f"Production holds v{other}, not v{before}" in last
    assert _production(None) == other
    assert not [r for r in registry.audit(include_pending=True) if r["to"] == new]
    registry.client.set_registered_model_alias(MODEL, "Production", before)


def test_two_local_nodes_train_one_model_that_is_registered(env, registry):
    """num_nodes=2 from the flow: two torchrun agents on this machine, gloo on CPU."""
    count = len(registry.versions())
    state = _run(num_nodes=2, devices=1, max_epochs=2, train_args=QUICK)
    assert state.is_completed(), state.message
    versions = registry.versions()
    assert len(versions) == count + 1
    tags = registry.client.get_model_version(MODEL, versions[-1].version).tags
    trainer = json.loads(tags["config"])["trainer"]
    assert trainer["world_size"] == 2 and trainer["num_nodes"] == 2, trainer
    assert tags["gate_decision"] in ("pass", "reject")


def test_training_that_hangs_is_killed_and_registers_nothing(env, registry, monkeypatch):
    import psutil

    monkeypatch.setenv("VALIFI_TRAIN_TIMEOUT_S", "3")
    count = len(registry.versions())
    state = _run()
    assert state.is_failed() and "training timed out after 3 s and was killed" in state.message
    assert len(registry.versions()) == count
    # this session's trainings only (tests run in parallel sessions of their own)
    left = [
        cmd
        for p in psutil.process_iter(["cmdline"])
        if "model.train" in (cmd := p.info["cmdline"] or []) and str(session_dir()) in " ".join(cmd)
    ]
    assert not left, left


def test_a_second_run_waits_for_the_one_holding_the_lock_then_refuses(env, registry):
    from flows.pipeline import run_lock

    count = len(registry.versions())
    with run_lock(5):  # as a deployment run would hold it
        r = valifi("train", env={**env, "VALIFI_TRAIN_LOCK_WAIT_S": "2"})
    assert r.returncode == 1
    assert "another train run held the lock 'valifi-train' for more than 2 s" in r.stdout + r.stderr
    assert len(registry.versions()) == count
    with run_lock(5):  # and the refused run did not leave the lock taken
        pass


def test_invalid_data_stops_before_training_and_registers_nothing(
    env, mlflow_client, fresh_db, external_pg, monkeypatch
):
    url = fresh_db(external_pg)
    seed(url, 1000, world=World(seed=3), end=NOW, days=6, bad=BadRows(malformed=0.1))
    monkeypatch.setenv("DATABASE_URL", url)
    count = len(_versions(mlflow_client))
    state = _run()
    assert state.is_failed() and "input_ok" in state.message
    assert len(_versions(mlflow_client)) == count

    small = fresh_db(external_pg)
    seed(small, 30, world=World(seed=3), end=NOW, days=6)
    monkeypatch.setenv("DATABASE_URL", small)
    state = _run()
    assert state.name == "Skipped" and "insufficient data: 30 trainable rows" in state.message
    assert len(_versions(mlflow_client)) == count


def test_promote_and_rollback_move_the_alias_and_leave_an_audit_record(
    env, mlflow_client, registry
):
    start = _production(mlflow_client)
    r = valifi("promote", "3", "--reason", "inspect v3 in production", env=env)
    assert r.returncode == 0, r.stderr
    assert _production(mlflow_client) == "3"
    r = valifi("rollback", "--reason", "v3 was only a drill", env=env)
    assert r.returncode == 0, r.stderr
    assert _production(mlflow_client) == start
    records = registry.audit()
    promote, rollback = records[-2], records[-1]
    assert (promote["action"], promote["from"], promote["to"]) == ("promote", start, "3")
    assert promote["why"] == "inspect v3 in production" and "@" in promote["by"]
    assert (rollback["action"], rollback["from"], rollback["to"]) == ("rollback", "3", start)
    assert rollback["why"] == "v3 was only a drill"
    assert datetime.fromisoformat(rollback["when"]) >= datetime.fromisoformat(promote["when"])
    r = valifi("promote", "99", "--reason", "x", env=env)
    assert r.returncode != 0 and "has no version 99" in r.stderr


def test_corrupted_artifact_fails_the_load_check_and_the_alias_stays(env, mlflow_client, stack_env):
    before = _production(mlflow_client)
    source = mlflow_client.get_model_version(MODEL, "3").source  # models:/m-...
    model_id = source.rsplit("/", 1)[-1]
    store = Path(stack_env["VALIFI_DATA_DIR"]) / "mlflow" / "artifacts"
    weights = [p for p in store.rglob("model.safetensors") if model_id in str(p)]
    assert len(weights) == 1
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights[0])
    key = next(k for k in tensors if k.startswith("head"))
    tensors[key] = tensors[key] * 3.0
    save_file(tensors, weights[0])

    r = valifi("promote", "3", "--reason", "should be refused", env=env)
    assert r.returncode != 0
    assert "load check of" in r.stderr and "canary scores differ" in r.stderr
    assert _production(mlflow_client) == before


def test_mlflow_models_serve_answers_for_production(env, stack_env):
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    proc = subprocess.Popen(
        mlflow_serve_command(MODEL, port),
        cwd=ROOT,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "mlflow models serve exited"
            time.sleep(1)
        body = {
            "dataframe_records": [
                {
                    "agent_type": "trading_advanced",
                    "task": "Analyze AAPL stock and suggest trade",
                    "context": {"symbol": "AAPL", "indicators": {"rsi": 85.0, "volatility": 0.2}},
                }
            ]
        }
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=30)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["agent"] == "trading_advanced" and pred["type"] == "execution"
        assert pred["result"]["action"] in BOTS["trading_advanced"].actions
        assert isinstance(pred["result"]["expected_reward"], float)
        assert len(pred["result"]["runners_up"]) == 3  # four actions in the bot's bank
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
