"""The first stages of the `train` flow on a real Prefect server and real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from model.synthetic import BadRows, World
from valifi.seed import seed

pytestmark = pytest.mark.e2e

NOW = datetime.now(UTC).replace(tzinfo=None, microsecond=0)


@pytest.fixture
def flow_db(stack_env, fresh_db, external_pg, monkeypatch):
    url = fresh_db(external_pg)
    monkeypatch.setenv("DATABASE_URL", url)
    return url


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    return {t.name.split("-")[0]: t for t in asyncio.run(go())}


def test_too_little_data_ends_as_skipped(flow_db):
    from flows.pipeline import train

    seed(flow_db, 42, world=World(seed=1), end=NOW, days=6)
    state = train(return_state=True)
    assert state.is_completed() and state.name == "Skipped"
    assert state.message == (
        "skipped: insufficient data: 42 trainable rows (scored, with readable payloads) "
        "of 42 exported < 100"
    )
    runs = _task_runs(state.state_details.flow_run_id)
    assert set(runs) == {"superseded", "shadow", "export"}  # validation never ran


def test_invalid_data_fails_before_training_with_the_failed_expectations(flow_db):
    from flows.pipeline import train

    seed(flow_db, 1000, world=World(seed=1), end=NOW, days=6, bad=BadRows(out_of_range=0.05))
    state = train(return_state=True)
    assert state.is_failed()
    assert "expect_column_values_to_be_between on reward" in state.message
    assert "5.00% unexpected" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert set(runs) == {"superseded", "shadow", "export", "validate"}
    assert runs["validate"].state.is_failed() and runs["validate"].run_count == 1


def test_unreachable_database_is_retried_then_fails_with_the_reason(stack_env, monkeypatch):
    from flows.pipeline import train
    from tests.helpers import free_port

    monkeypatch.setenv("DATABASE_URL", f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    state = train(return_state=True)
    assert state.is_failed()
    assert "export from table 'bot_training_data' failed" in state.message
    assert "Connection refused" in state.message or "connection" in state.message.lower()
    export_run = _task_runs(state.state_details.flow_run_id)["export"]
    assert export_run.run_count == 3  # first try plus the two retries the settings ask for


def _evaluate_once(registry, tmp_path):
    """The evaluate task, with the flow's retries, on a small trained challenger."""
    from prefect import flow

    from core.settings import GateSpec, Settings
    from flows.pipeline import evaluate_task, io_retries
    from model.result import TrainResult
    from tests.helpers import train_small

    snap, out = train_small(tmp_path, seed=7)
    result = TrainResult.read(out)

    @flow(name="evaluate-probe")
    def probe():
        task = evaluate_task.with_options(**io_retries(Settings()))
        return task(registry, result, str(snap), GateSpec(), tmp_path / "cache")

    return probe(return_state=True)


def test_an_error_in_the_evaluation_code_fails_at_once_with_its_traceback(
    stack_env, tmp_path, monkeypatch
):
    import flows.gate
    from core.registry import Registry

    def broken(*args, **kwargs):
        return [][0]  # a bug of ours, as the unknown-bot ranking once was

    monkeypatch.setattr(flows.gate, "compare_on_holdout", broken)
    registry = Registry(stack_env["MLFLOW_TRACKING_URI"], "valifi-agent-evaluate-probe")
    state = _evaluate_once(registry, tmp_path)
    assert state.is_failed() and "IndexError" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["evaluate"].run_count == 1  # not retried: another try cannot fix it


def test_an_unreachable_registry_during_the_evaluation_is_retried(tmp_path, monkeypatch, stack_env):
    from core.registry import Registry
    from tests.helpers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    registry = Registry(f"http://127.0.0.1:{free_port()}", "valifi-agent-evaluate-probe")
    state = _evaluate_once(registry, tmp_path)
    assert state.is_failed() and "Connection refused" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["evaluate"].run_count == 3  # the first try and the settings' two retries


def test_a_champion_that_cannot_be_loaded_leaves_the_floors_to_decide(stack_env, tmp_path):
    """Production points at a version whose weights were corrupted (it serves nobody):
    the evaluation does not fail every night on it; the challenger is judged on the
    floors, and the reason names the broken champion."""
    from safetensors.torch import load_file, save_file

    from core.registry import Registry
    from tests.helpers import register_small, set_alias_by_hand

    def corrupt(artifact):
        weights = artifact / "model.safetensors"
        tensors = load_file(weights)
        key = next(k for k in tensors if k.startswith("head"))
        tensors[key] = tensors[key] * 3.0
        save_file(tensors, weights)

    uri, model = stack_env["MLFLOW_TRACKING_URI"], "valifi-agent-broken-champion"
    version = register_small(uri, model, tmp_path / "champion", seed=7, tamper=corrupt)
    set_alias_by_hand(uri, model, version)
    state = _evaluate_once(Registry(uri, model), tmp_path)
    assert state.is_completed(), state.message
    gate = state.result()
    assert gate["champion_version"] == version and gate["mse_diff"] is None
    assert f"v{version} cannot be loaded (canary scores differ" in gate["summary"]
    assert "judged on floors alone" in gate["summary"]
