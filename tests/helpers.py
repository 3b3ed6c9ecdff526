"""Test helpers, imported as `tests.helpers` (never import from conftest: pytest loads
it under another name, so a second import would run it twice). Importing this module
changes nothing: the test environment is set up by conftest.py alone. What the
benchmarks share with the tests lives in `valifi.experiments`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from core.processes import stop_group as stop_server
from model.synthetic import World, write_snapshot
from valifi.experiments import (
    ROOT,
    drift_recovery,
    free_port,
    mlflow_serve_command,
    register,
)
from valifi.experiments import start_agent_server as start_server
from valifi.experiments import train_command as model_train_command

__all__ = [
    "ANY_MODEL",
    "ROOT",
    "drift_recovery",
    "free_port",
    "mlflow_serve_command",
    "model_train_command",
    "start_server",
    "stop_server",
]


def session_dir() -> Path:
    """This test session's own folder (made by conftest.py)."""
    return Path(os.environ["VALIFI_TEST_SESSION_DIR"])


def valifi(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `valifi` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "valifi.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def train_small(
    root: Path,
    seed: int,
    rows: int = 1500,
    epochs: int | None = 2,
    extra: tuple[str, ...] = (),
    train_seed: int | None = None,
) -> tuple[Path, Path]:
    """Train with `python -m model.train` on a synthetic snapshot of `rows` rows made with
    `seed`: (snapshot, training output folder). `epochs=None` keeps the model's default;
    the training seed is `seed` unless `train_seed` is given.

    Training is deterministic, so the same arguments are trained once per test session:
    a second call gets a copy of the first one's output (its own, to change at will)."""
    key = (seed, rows, epochs, extra, train_seed)
    out = root / f"out{seed}"
    if key in _TRAINED:
        snap, first = _TRAINED[key]
        shutil.copytree(first, out)
        return snap, out
    snap = write_snapshot(root / f"snap{seed}", rows, World(seed=seed))
    cmd = model_train_command(snap, out, seed if train_seed is None else train_seed, *extra)
    if epochs is not None:
        cmd += ["--max-epochs", str(epochs)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pristine = session_dir() / "trained" / f"{len(_TRAINED)}"
    shutil.copytree(out, pristine)  # kept as trained, whatever the caller does to `out`
    _TRAINED[key] = (snap, pristine)
    return snap, out


_TRAINED: dict[tuple, tuple[Path, Path]] = {}

# where any model serves (the serving tests): trained without distillation, in a third
# of the time
ANY_MODEL = ("--distill", "0")


def register_small(uri: str, model: str, root: Path, seed: int, tamper=None) -> str:
    """Train a small model, optionally let `tamper(artifact_dir)` change it, register it."""
    snap, out = train_small(root, seed, extra=ANY_MODEL)
    if tamper is not None:
        tamper(out / "artifact")
    return register(uri, model, out, snap, key=f"test-{model}-{out}")


def set_alias_by_hand(uri: str, model: str, version: str) -> None:
    """Move Production as the MLflow UI does: no check, no audit record."""
    from core.registry import Registry

    Registry(uri, model).client.set_registered_model_alias(model, "Production", version)


@contextlib.contextmanager
def module_settings(server_url: str, db_name: str, values: dict[str, str]):
    """A database of its own on `server_url` and these settings in the environment, for
    the length of a test module; yields {**values, "DATABASE_URL": ...}."""
    import psycopg2
    import pytest

    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{db_name}"')
    parts = urlsplit(server_url)  # (a socket URL keeps its host in the query)
    values = {"DATABASE_URL": urlunsplit(parts._replace(path=f"/{db_name}")), **values}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in values.items():
                mp.setenv(k, v)
            yield values
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        conn.close()


def run_summary(state) -> str:
    """The markdown summary a `train` flow run published (its `train-summary` artifact)."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await client.read_artifacts()

    run = state.state_details.flow_run_id
    (art,) = [a for a in asyncio.run(go()) if a.flow_run_id == run and a.key == "train-summary"]
    return art.data
