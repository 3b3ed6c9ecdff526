"""Experiments on the synthetic world, shared by the benchmarks and the tests.

Train on a synthetic snapshot, register and serve what was trained, start a tracking
server of one's own, measure what a retrain recovers after a drift. Nothing here
changes the environment or starts anything when imported: each function says what it
starts, and the context managers stop it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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


def train_command(snapshot: Path, out: Path, seed: int | None = None, *extra: str) -> list[str]:
    """`python -m model.train` on `snapshot` into `out`, quietly, as the flow launches it
    (with the `VALIFI_TRAIN_*` settings of the environment, e.g. its threads); `seed`
    None: the settings' seed."""
    from core.settings import Settings
    from flows.training import commands

    spec = Settings().train
    if seed is not None:
        spec = spec.model_copy(update={"seed": seed})
    return commands(Path(snapshot), Path(out), spec, extra)[0]


def train(
    snapshot: Path, out: Path, seed: int | None = None, *extra: str, timeout: float = 3600
) -> Path:
    """Run one training to completion; returns `out`. Raises with the log's tail."""
    r = subprocess.run(
        train_command(snapshot, out, seed, *extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(f"training into {out} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return Path(out)


def register(uri: str, model: str, out: Path, snapshot: Path, key: str | None = None) -> str:
    """Register a training output as a version of `model` (gate marked passed, as a test
    or bench fixture); returns the version. Idempotent per `key`."""
    from core.registry import Registry
    from model.result import TrainResult

    gate = {"passed": True, "reasons": ["experiment fixture"]}
    key = key or f"experiment-{model}-{out}"
    result = TrainResult.read(out)
    return (
        Registry(uri, model)
        .register(result, snapshot, gate, {"gate_decision": "pass"}, key)
        .version
    )


def mlflow_serve_command(model: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow models serve` of `model`@Production on 127.0.0.1 (needs the venv's bin
    folder on PATH: it runs `uvicorn`)."""
    return [
        sys.executable,
        *("-m", "mlflow", "models", "serve", "-m", f"models:/{model}@Production"),
        *("--env-manager", "local", "-h", "127.0.0.1", "-w", str(workers), "-p", str(port)),
    ]


def with_venv_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this Python's bin folder first on PATH (mlflow execs `uvicorn`)."""
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


@contextlib.contextmanager
def own_mlflow(folder: Path) -> Iterator[str]:
    """An MLflow tracking server of its own, as `valifi stack` starts it, with its data
    in `folder` and on a free port; yields its URI and stops it afterwards."""
    from core.settings import Settings
    from valifi import stack

    settings = Settings(
        _env_file=None,
        data_dir=Path(folder),
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        mlflow_backend_store_uri=None,
    )
    try:
        stack.start(settings, {"mlflow"})
        yield settings.mlflow_tracking_uri
    finally:
        stack.down(settings)


def start_agent_server(port: int, env: dict[str, str], workers: int = 2) -> subprocess.Popen:
    """`valifi serve` on `port` in a process group of its own, once `/health` answers
    (stop it with `core.processes.stop_group`)."""
    import httpx

    from core.processes import stop_group

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "valifi.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent server on :{port} exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_group(proc)
    raise RuntimeError(f"the agent server on :{port} did not become healthy in 120 s")


def drift_recovery(root: Path, rows: int = 4000) -> dict:
    """Champion trained on the week before the drift; the nightly run after it trains on
    the last week (5 of its 7 days drifted). Both judged on that run's holdout by the
    gate; true values from the generator: what the champion earned before the drift
    and after, what the retrain earns after, and the share of the loss recovered."""
    import numpy as np

    from core.settings import GateSpec
    from flows.gate import compare_on_holdout
    from model.artifact import load
    from model.result import TrainResult
    from model.snapshot import read_rows, temporal_split
    from model.synthetic import World, write_snapshot

    root = Path(root)
    end = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    drift = end - timedelta(days=5)
    before = write_snapshot(root / "before", rows, World(seed=1), end=drift)
    after = write_snapshot(root / "after", rows, World(seed=2, drift_at=drift), end=end)
    champion = load(train(before, root / "champion", 0) / "artifact")
    out = train(after, root / "challenger", 0)
    challenger = load(out / "artifact")
    cfg = TrainResult.read(out).train_config
    train_df, _, holdout = temporal_split(
        read_rows(after), cfg["val_fraction"], cfg["holdout_fraction"]
    )
    decision = compare_on_holdout(GateSpec(), challenger, champion, train_df, holdout, "1")

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
