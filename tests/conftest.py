"""Shared fixtures: real services, each started once per test session on ports of its own.

- `stack_env`: the local stack (embedded PostgreSQL, MLflow, Prefect) started with
  `valifi stack up` in a temporary data directory; stopped with `valifi stack down`.
- `external_pg`: a PostgreSQL reached through a URL, as `DATABASE_URL` users have
  one: `VALIFI_TEST_DATABASE_URL`, else 127.0.0.1:5432/test when it answers, else a
  second embedded server playing that part.
- `fresh_db(server_url)`: a new empty database on either server, dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from valifi.experiments import free_port

# The test session's own stack: ports and folders of its own, set before any test
# module imports Prefect or MLflow (both read their settings early). Flows called
# in-process and `valifi` subprocesses alike then talk to these services.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="valifi-tests-"))
STACK_ENV = {
    "VALIFI_TEST_SESSION_DIR": str(_SESSION_DIR),
    "VALIFI_DATA_DIR": str(_SESSION_DIR / "stack"),
    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
    "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
    "PREFECT_HOME": str(_SESSION_DIR / "prefect-client"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    "VALIFI_RETRY_DELAYS_S": "[0.2, 0.2]",
    "VALIFI_WATCH_WINDOW_S": "0",  # tests that watch a server set their own
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Each parallel session trains on its share of the cores: two trainings of two
    # threads each on two cores took 2.4 times as long as with one thread each.
    "VALIFI_TRAIN_THREADS": str(
        max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    ),
}
for _var in ("DATABASE_URL", "PYTHON_AGENT_URL"):
    os.environ.pop(_var, None)
os.environ.update(STACK_ENV)

from tests.helpers import valifi  # noqa: E402 (after the environment is set)

# The modules that take longest, longest first (measured on 2 cores, in parallel
# sessions): scripts/test.py hands out whole modules in collection order, and a long
# module left for the end keeps one session busy while the other idles.
SLOWEST_FIRST = (
    "tests/model/test_behaviour.py",
    "tests/model/test_drift.py",
    "tests/e2e/test_train_flow.py",
    "tests/e2e/test_deployment.py",
    "tests/e2e/test_serving.py",
    "tests/e2e/test_shadow.py",
    "tests/e2e/test_export.py",
    "tests/e2e/test_decisions.py",
    "tests/e2e/test_bots_change.py",
    "tests/model/test_training.py",
)


def _slow_rank(item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return SLOWEST_FIRST.index(path) if path in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_slow_rank)  # stable: each module keeps its own order
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """The session's running stack (embedded PostgreSQL, MLflow, Prefect) and its settings."""
    up = valifi("stack", "up", env={})
    assert up.returncode == 0, up.stdout + up.stderr
    yield dict(STACK_ENV)
    down = valifi("stack", "down", env={})
    assert down.returncode == 0, down.stdout + down.stderr
    if not os.environ.get("VALIFI_KEEP_TEST_DATA"):
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_pg(stack_env) -> str:
    """URL of the stack's embedded PostgreSQL."""
    from core.settings import Settings
    from valifi import stack

    return stack.start_embedded_pg(Settings(data_dir=stack_env["VALIFI_DATA_DIR"], _env_file=None))


def _answers(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


@pytest.fixture(scope="session")
def external_pg(tmp_path_factory) -> Iterator[str]:
    url = os.environ.get("VALIFI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    if _answers(url):
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    server = pgserver.get_server(tmp_path_factory.mktemp("external-pg"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def fresh_db() -> Iterator[Callable[[str], str]]:
    """Make a new empty database on a server; every one made is dropped at the end."""
    made: list[tuple[str, str]] = []

    def make(server_url: str) -> str:
        name = f"valifi_t_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(server_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        made.append((server_url, name))
        return _with_db(server_url, name)

    yield make
    for server_url, name in made:
        conn = psycopg2.connect(server_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
