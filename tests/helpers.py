"""Test helpers, imported as `tests.helpers` (never import from conftest: pytest loads
it under another name, so a second import would run it twice)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows.export import SCHEMA
from model.features import canonical_json
from model.synthetic import BadRows, World

ROOT = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this process handed out before (the kernel
    may offer a just-closed port again before its first taker binds it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


# The test session's own stack: ports and folders of its own, set before any test
# module imports Prefect or MLflow (both read their settings early). Flows called
# in-process and `valifi` subprocesses alike then talk to these services.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="valifi-tests-"))
STACK_ENV = {
    "VALIFI_DATA_DIR": str(_SESSION_DIR / "stack"),
    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
    "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
    "PREFECT_HOME": str(_SESSION_DIR / "prefect-client"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    "VALIFI_RETRY_DELAYS_S": "[0.2, 0.2]",
    "VALIFI_WATCH_WINDOW_S": "0",  # tests that watch a server set their own
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
for _var in ("DATABASE_URL", "PYTHON_AGENT_URL"):
    os.environ.pop(_var, None)
os.environ.update(STACK_ENV)


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


def synthetic_snapshot(
    folder: Path,
    rows: int,
    seed: int = 0,
    days: float = 7.0,
    end: datetime | None = None,
    bad: BadRows | None = None,
    drift_at: datetime | None = None,
    hard: bool = False,
    only: tuple[str, ...] | None = None,
) -> Path:
    """A snapshot folder (data.parquet + manifest.json) straight from the generator
    (its hard world with `hard`; rows of the bots `only` names, if given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    end = end or datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    world = World(seed=seed, drift_at=drift_at, hard=hard, only=only)
    df = world.generate(rows, days=days, end=end, bad=bad)
    df = df.iloc[::-1]  # newest first, as exported
    table = pa.table(
        {
            "id": df["id"],
            "bot_id": df["bot"],
            "bot": df["bot"],
            "data_type": df["data_type"],
            "input": [x if isinstance(x, str) else canonical_json(x) for x in df["input"]],
            "input_ok": [isinstance(x, dict) for x in df["input"]],
            "action": [canonical_json(a) for a in df["action"]],
            "action_ok": [True] * len(df),
            "reward": df["reward"],
            "created_at": pa.array(df["created_at"], pa.timestamp("us")).cast(
                pa.timestamp("us", tz="UTC")
            ),
        },
        schema=SCHEMA,
    )
    pq.write_table(table, folder / "data.parquet")
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "sha256": f"synthetic-{seed}-{rows}",
                "window": {},
                "layout": "synthetic",
            }
        )
    )
    return folder


def model_train_command(snapshot: Path, out: Path, seed: int | None, *extra: str) -> list[str]:
    """`python -m model.train` on `snapshot` into `out`, quietly; `seed` None: its default."""
    cmd = [sys.executable, "-m", "model.train", "--snapshot", str(snapshot), "--out", str(out)]
    return [*cmd, "--no-progress", *(["--seed", str(seed)] if seed is not None else []), *extra]


def mlflow_serve_command(model: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow models serve` of `model`@Production on 127.0.0.1 (needs the venv's bin
    folder on PATH: it runs `uvicorn`)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{model}@Production",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-w",
        str(workers),
        "-p",
        str(port),
    ]


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
    snap = synthetic_snapshot(root / f"snap{seed}", rows, seed=seed)
    cmd = model_train_command(snap, out, seed if train_seed is None else train_seed, *extra)
    if epochs is not None:
        cmd += ["--max-epochs", str(epochs)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pristine = _SESSION_DIR / "trained" / f"{len(_TRAINED)}"
    shutil.copytree(out, pristine)  # kept as trained, whatever the caller does to `out`
    _TRAINED[key] = (snap, pristine)
    return snap, out


_TRAINED: dict[tuple, tuple[Path, Path]] = {}


def register_small(uri: str, model: str, root: Path, seed: int, tamper=None) -> str:
    """Train a small model, optionally let `tamper(artifact_dir)` change it, register it."""
    from core.registry import Registry
    from model.result import TrainResult

    snap, out = train_small(root, seed)
    if tamper is not None:
        tamper(out / "artifact")
    gate = {"passed": True, "reasons": ["test fixture"]}
    result = TrainResult.read(out)
    lineage = {"gate_decision": "pass"}
    key = f"test-{model}-{out}"
    return Registry(uri, model).register(result, snap, gate, lineage, key).version


def set_alias_by_hand(uri: str, model: str, version: str) -> None:
    """Move Production as the MLflow UI does: no check, no audit record."""
    from core.registry import Registry

    Registry(uri, model).client.set_registered_model_alias(model, "Production", version)


def start_server(port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "valifi.cli", "serve", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited during start-up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    """TERM to the server's process group, KILL after 30 s; a group already gone is fine."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


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
    values = {"DATABASE_URL": server_url.rsplit("/", 1)[0] + f"/{db_name}", **values}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in values.items():
                mp.setenv(k, v)
            yield values
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        conn.close()


def _train_default(snap: Path, out: Path) -> Path:
    """`python -m model.train` with its defaults (seed 0)."""
    r = subprocess.run(
        model_train_command(snap, out, 0), cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def drift_recovery(root: Path, rows: int = 4000) -> dict:
    """Champion trained on the week before the drift; the nightly run after it trains on
    the last week (5 of its 7 days drifted). Both judged on that run's holdout by the
    gate; true values from the generator: what the champion earned before the drift
    and after, what the retrain earns after, and the share of the loss recovered."""
    from core.settings import GateSpec
    from flows.training import compare
    from model.artifact import load
    from model.module import read_snapshot, temporal_split
    from model.result import TrainResult

    end = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    drift = end - timedelta(days=5)
    before = synthetic_snapshot(root / "before", rows, seed=1, end=drift)
    after = synthetic_snapshot(root / "after", rows, seed=2, end=end, drift_at=drift)
    champion = load(_train_default(before, root / "champion") / "artifact")
    out = _train_default(after, root / "challenger")
    challenger = load(out / "artifact")
    cfg = TrainResult.read(out).train_config
    df = read_snapshot(after)
    train_df, _, holdout = temporal_split(df, cfg["val_fraction"], cfg["holdout_fraction"])
    decision = compare(GateSpec(), challenger, champion, train_df, holdout, "1")

    bots, inputs = list(holdout["bot"]), list(holdout["input"])
    types = list(holdout["data_type"])
    whens = [t.to_pydatetime().replace(tzinfo=None) for t in holdout["created_at"]]
    now_world, old_world = World(drift_at=drift), World()

    def value(world, actions) -> float:
        return float(
            np.mean(
                [
                    world.true_reward(b, x, a, w)
                    for b, x, a, w in zip(bots, inputs, actions, whens, strict=True)
                ]
            )
        )

    champ_actions = champion.choose(bots, inputs, types)
    had = value(old_world, champ_actions)  # what the champion earned before the drift
    has = value(now_world, champ_actions)
    new = value(now_world, challenger.choose(bots, inputs, types))
    return {
        "champion_before": had,
        "champion_after": has,
        "challenger_after": new,
        "lost": had - has,
        "recovered": (new - has) / (had - has) if had > has else float("nan"),
        "decision": decision,
    }


@contextlib.contextmanager
def own_mlflow() -> Iterator[str]:
    """An MLflow tracking server of this process's own, in its throw-away data folder
    (what `valifi stack` starts); yields its URI. Stops it and removes the folder
    afterwards, unless VALIFI_KEEP_BENCH_DATA is set."""
    from core.settings import Settings
    from valifi import stack

    settings = Settings(_env_file=None)
    try:
        stack.start(settings, {"mlflow"})
        yield STACK_ENV["MLFLOW_TRACKING_URI"]
    finally:
        stack.down(settings)
        if not os.environ.get("VALIFI_KEEP_BENCH_DATA"):
            shutil.rmtree(_SESSION_DIR, ignore_errors=True)
