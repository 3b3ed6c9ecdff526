"""`valifi stack up | status | down` against the real processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg2
import pytest

from tests.helpers import free_port, valifi

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    """Running, not an exited child waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pids(data_dir: str) -> dict[str, int]:
    run = Path(data_dir) / "run"
    return {p.stem: json.loads(p.read_text())["pid"] for p in run.glob("*.json")}


def test_up_status_and_second_up_reuses(stack_env):
    env = {}
    status = valifi("stack", "status", env=env)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert "embedded" in lines["postgres"]
    assert "running" in lines["mlflow"] and stack_env["MLFLOW_TRACKING_URI"] in lines["mlflow"]
    assert "running" in lines["prefect"]
    before = _pids(stack_env["VALIFI_DATA_DIR"])
    again = valifi("stack", "up", env=env)
    assert again.returncode == 0, again.stderr
    assert _pids(stack_env["VALIFI_DATA_DIR"]) == before  # reused, nothing new started
    logs = Path(stack_env["VALIFI_DATA_DIR"]) / "logs"
    assert (logs / "mlflow.log").stat().st_size > 0
    assert (logs / "prefect.log").exists()
    for pid in before.values():
        # bound to 127.0.0.1 only
        conns = [
            c
            for p in [psutil.Process(pid), *psutil.Process(pid).children(True)]
            for c in p.net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns)


def test_port_taken_by_something_else_fails_clearly(tmp_path, external_pg):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {
            "VALIFI_DATA_DIR": str(tmp_path),
            "DATABASE_URL": external_pg,
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
            "PREFECT_API_URL": "https://prefect.example.invalid/api",  # external: not managed
        }
        r = valifi("stack", "up", env=env)
    assert r.returncode != 0
    assert f"port {port} for mlflow is taken by another process" in r.stderr
    assert _pids(str(tmp_path)) == {}


def test_down_stops_only_what_it_started_and_postgres_persists(tmp_path):
    """A stack of its own: embedded PostgreSQL plus Prefect; a bystander process survives."""
    env = {
        "VALIFI_DATA_DIR": str(tmp_path),
        "MLFLOW_TRACKING_URI": "https://mlflow.example.invalid",  # external: not managed
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
    }
    bystander = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(free_port()), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        up = valifi("stack", "up", env=env)
        assert up.returncode == 0, up.stderr
        prefect_pid = _pids(str(tmp_path))["prefect"]
        pg_url = next(ln.split()[2] for ln in up.stdout.splitlines() if ln.startswith("postgres"))
        with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        conn.close()

        down = valifi("stack", "down", env=env)
        assert down.returncode == 0, down.stderr
        assert "prefect" in down.stdout and "postgres" in down.stdout
        assert not _alive(prefect_pid)
        assert bystander.poll() is None  # not ours: left running
        status = valifi("stack", "status", env=env)
        assert status.returncode != 0 and "stopped" in status.stdout

        # PostgreSQL's data persists across a restart of the embedded server.
        up = valifi("stack", "up", env=env)
        assert up.returncode == 0, up.stderr
        with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchone() == (42,)
        conn.close()
    finally:
        valifi("stack", "down", env=env)
        bystander.terminate()
        bystander.wait(10)


def test_import_mlflow_from_repository_root_is_the_library():
    root = Path(__file__).resolve().parents[2]
    assert (root / "mlflow").is_dir() and not (root / "mlflow" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import mlflow; print(mlflow.__file__, mlflow.__version__)"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout


def test_apps_worker_and_agent_server_start_and_stop_with_the_stack(stack_env):
    import httpx

    port = free_port()
    env = {"PYTHON_AGENT_URL": f"http://127.0.0.1:{port}", "VALIFI_MODEL_NAME": "no-such-model"}
    up = valifi("stack", "up", "--apps", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        pids = _pids(stack_env["VALIFI_DATA_DIR"])
        assert {"worker", "agent"} <= set(pids)
        status = valifi("stack", "status", env=env)
        lines = {line.split()[0]: line for line in status.stdout.splitlines()}
        assert "running" in lines["worker"] and "running" in lines["agent"]
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"task": "What is Valifi?"})
        assert r.status_code == 200 and r.json()["type"] == "info"
        worker = psutil.Process(pids["worker"])
        assert "worker" in " ".join(worker.cmdline())
    finally:
        down = valifi("stack", "down", "--apps", env=env)
    assert down.returncode == 0 and "worker" in down.stdout and "agent" in down.stdout
    assert not _alive(pids["agent"]) and not _alive(pids["worker"])
    assert "mlflow" in _pids(stack_env["VALIFI_DATA_DIR"])  # the services stay up
