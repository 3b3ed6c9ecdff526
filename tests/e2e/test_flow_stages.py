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
    assert set(runs) == {"superseded", "export"}  # validation never ran


def test_invalid_data_fails_before_training_with_the_failed_expectations(flow_db):
    from flows.pipeline import train

    seed(flow_db, 1000, world=World(seed=1), end=NOW, days=6, bad=BadRows(out_of_range=0.05))
    state = train(return_state=True)
    assert state.is_failed()
    assert "expect_column_values_to_be_between on reward" in state.message
    assert "5.00% unexpected" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert set(runs) == {"superseded", "export", "validate"}
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
