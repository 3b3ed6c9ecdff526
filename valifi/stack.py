"""The local stack: PostgreSQL, an MLflow tracking server and a Prefect server.

Everything listens on 127.0.0.1 (PostgreSQL embedded: on a Unix socket only) and
keeps its data, PIDs and logs under `Settings.data_dir`:

    .valifi/pg/                 embedded PostgreSQL cluster (pgserver)
    .valifi/mlflow/             SQLite backend store and artifact root
    .valifi/prefect/            PREFECT_HOME of the server
    .valifi/run/NAME.json       pid and start time of a process we started
    .valifi/logs/NAME.log       its output

`up` is idempotent: a service that answers and that we started is reused; a port
held by anything else is an error, never silently shared. `down` stops only the
processes recorded under run/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from core.settings import Settings


class StackError(RuntimeError):
    """A service could not be started or reached; the message says why and what to do."""


@dataclass(frozen=True)
class Service:
    name: str
    url: str  # what users open / clients use
    health_url: str | None  # None: alive is healthy (a worker has no HTTP endpoint)
    port: int | None
    command: list[str]
    env: dict[str, str]
    cwd: Path | None = None  # None: the data directory


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    state: str  # "running", "stopped", "external", "embedded"
    pid: int | None = None

    def line(self) -> str:
        pid = f" (pid {self.pid})" if self.pid else ""
        return f"{self.name:<10} {self.state:<9} {self.url}{pid}"


# --- layout -------------------------------------------------------------------


def _dirs(settings: Settings) -> dict[str, Path]:
    root = settings.data_dir
    return {k: root / k for k in ("pg", "mlflow", "prefect", "run", "logs")}


def _bin(name: str) -> str:
    """A console script installed beside this interpreter (the venv's)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


# --- embedded PostgreSQL ------------------------------------------------------------


def _pgserver():
    """Import pgserver without its warning about a missing XDG_RUNTIME_DIR (it falls back)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.utils
    return pgserver


def embedded_pg_running(settings: Settings) -> int | None:
    """PID of the embedded PostgreSQL postmaster when it runs, else None."""
    PostmasterInfo = _pgserver().utils.PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(_dirs(settings)["pg"])
    return info.pid if info is not None and info.is_running() else None


def start_embedded_pg(settings: Settings) -> str:
    """Start (or reuse) the embedded PostgreSQL; returns its connection URL."""
    pgserver = _pgserver()
    pgdata = _dirs(settings)["pg"]
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, like the other services.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri()


def stop_embedded_pg(settings: Settings, timeout: float = 30.0) -> bool:
    pid = embedded_pg_running(settings)
    if pid is None:
        return False
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast shutdown"
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    return True


def database_url(settings: Settings) -> str:
    """The database to use: DATABASE_URL when set, else the embedded server (started on demand)."""
    return settings.database_url or start_embedded_pg(settings)


# --- HTTP services ------------------------------------------------------------------


def _local(name: str, port: int, health: str, command: list[str], env: dict) -> Service:
    """An HTTP service of this machine on `port` (health at `health`), quietly logged."""
    url = f"http://127.0.0.1:{port}"
    env = {"PYTHONUNBUFFERED": "1", **env}
    return Service(name, url, f"{url}{health}", port, command, env)


def services(settings: Settings) -> list[Service]:
    """The HTTP services this stack manages: those whose URL points at this machine."""
    d = _dirs(settings)
    out = []
    if (port := settings.local_port(settings.mlflow_tracking_uri)) is not None:
        backend = settings.mlflow_backend_store_uri or f"sqlite:///{d['mlflow'] / 'mlflow.db'}"
        command = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", "1", "--backend-store-uri", backend]
        command += ["--artifacts-destination", str(d["mlflow"] / "artifacts")]
        # The job runner starts ~8 extra processes that nothing here uses.
        out.append(
            _local(
                "mlflow", port, "/health", command, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            )
        )
    if (port := settings.local_port(settings.prefect_api_url)) is not None:
        command = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        env = {
            "PREFECT_HOME": str(d["prefect"]),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
        }
        out.append(_local("prefect", port, "/api/health", command, env))
    return out


def apps(settings: Settings) -> list[Service]:
    """The project's own long-running processes: the Prefect worker and the agent server."""
    out = [
        Service(
            name="worker",
            url=f"pool valifi-process at {settings.prefect_api_url}",
            health_url=None,
            port=None,
            command=[_bin("valifi"), "worker"],
            env={"PYTHONUNBUFFERED": "1"},
            cwd=Path.cwd(),
        )
    ]
    port = settings.local_port(settings.python_agent_url)
    if port is not None:
        out.append(
            Service(
                name="agent",
                url=f"http://127.0.0.1:{port}",
                health_url=f"http://127.0.0.1:{port}/health",
                port=port,
                command=[_bin("valifi"), "serve", "--port", str(port)],
                env={"PYTHONUNBUFFERED": "1"},
                cwd=Path.cwd(),
            )
        )
    return out


def _pidfile(settings: Settings, name: str) -> Path:
    return _dirs(settings)["run"] / f"{name}.json"


def _recorded_process(settings: Settings, name: str) -> psutil.Process | None:
    """The process we started for `name`, if it still runs (pid reuse is checked)."""
    path = _pidfile(settings, name)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    try:
        proc = psutil.Process(record["pid"])
        if "started_after_boot_s" in record:
            same = abs(_started_after_boot(proc) - record["started_after_boot_s"]) < 1.0
        else:  # a record written before that field (the wall clock since may have moved)
            same = abs(proc.create_time() - record["create_time"]) < 1.0
        # an exited child nobody reaped yet is a zombie: as good as gone
        if same and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.NoSuchProcess:
        pass
    return None


def _healthy(url: str | None) -> bool:
    if url is None:
        return True
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _start(settings: Settings, svc: Service) -> psutil.Process:
    d = _dirs(settings)
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    log = open(d["logs"] / f"{svc.name}.log", "ab")  # noqa: SIM115 - handed to the child
    # the same settings in every child, wherever it runs
    env = {**os.environ, **svc.env, "VALIFI_DATA_DIR": str(settings.data_dir)}
    popen = subprocess.Popen(
        svc.command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=svc.cwd or settings.data_dir,
        start_new_session=True,  # its own process group: `down` stops the whole tree
    )
    log.close()
    proc = psutil.Process(popen.pid)
    record = {
        "pid": popen.pid,
        "create_time": proc.create_time(),
        "started_after_boot_s": _started_after_boot(proc),
        "url": svc.url,
    }
    _pidfile(settings, svc.name).write_text(json.dumps(record))
    return proc


def _started_after_boot(proc: psutil.Process) -> float:
    """When `proc` started, in seconds after boot: what the kernel records, unmoved by a
    step of the wall clock (psutil's create_time is boot time by the wall clock plus
    this, so a clock step moves it, and a process we started looked like another's)."""
    return proc.create_time() - psutil.boot_time()


def _wait_healthy(settings: Settings, svc: Service, proc: psutil.Process) -> None:
    deadline = time.monotonic() + settings.stack_timeout_s
    log = _dirs(settings)["logs"] / f"{svc.name}.log"
    settle = time.monotonic() + (3.0 if svc.health_url is None else 0.0)
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise StackError(f"{svc.name} exited during start-up; see {log}")
        if _healthy(svc.health_url) and time.monotonic() >= settle:
            return
        time.sleep(0.5)
    raise StackError(
        f"{svc.name} did not answer {svc.health_url} within {settings.stack_timeout_s:.0f} s; "
        f"see {log}"
    )


def up(settings: Settings, with_apps: bool = False) -> list[ServiceStatus]:
    """Start what is not running yet and wait until every service is healthy.

    `with_apps`: also the Prefect worker and the agent server, once the services answer.
    """
    out = []
    if settings.database_url:
        out.append(ServiceStatus("postgres", _redact(settings.database_url), "external"))
    else:
        url = start_embedded_pg(settings)
        out.append(ServiceStatus("postgres", url, "embedded", embedded_pg_running(settings)))
    out += _up(settings, services(settings))
    if with_apps:
        out += _up(settings, apps(settings))
    (settings.data_dir / "stack.json").write_text(
        json.dumps({s.name: s.url for s in out}, indent=2)
    )
    return out


def start(settings: Settings, names: set[str]) -> list[ServiceStatus]:
    """Start just the named services and apps (say {"mlflow"}) and wait until they answer."""
    return _up(settings, [s for s in services(settings) + apps(settings) if s.name in names])


def _up(settings: Settings, wanted: list[Service]) -> list[ServiceStatus]:
    # Start every service before waiting for any: their start-ups overlap.
    out, procs = [], []
    for svc in wanted:
        proc = _recorded_process(settings, svc.name)
        if proc is None:
            if svc.port is not None and port_in_use(svc.port):
                raise StackError(
                    f"port {svc.port} for {svc.name} is taken by another process; stop it, "
                    f"or point {_url_var(svc.name)} at another port"
                )
            proc = _start(settings, svc)
        procs.append((svc, proc))
    for svc, proc in procs:
        _wait_healthy(settings, svc, proc)
        out.append(ServiceStatus(svc.name, svc.url, "running", proc.pid))
    return out


def status(settings: Settings) -> list[ServiceStatus]:
    out = []
    if settings.database_url:
        out.append(ServiceStatus("postgres", _redact(settings.database_url), "external"))
    else:
        pid = embedded_pg_running(settings)
        out.append(
            ServiceStatus(
                "postgres", str(_dirs(settings)["pg"]), "embedded" if pid else "stopped", pid
            )
        )
    started_apps = [a for a in apps(settings) if _pidfile(settings, a.name).exists()]
    for svc in services(settings) + started_apps:
        proc = _recorded_process(settings, svc.name)
        if proc is not None and _healthy(svc.health_url):
            out.append(ServiceStatus(svc.name, svc.url, "running", proc.pid))
        elif proc is not None:
            out.append(ServiceStatus(svc.name, svc.url, "starting", proc.pid))
        else:
            out.append(ServiceStatus(svc.name, svc.url, "stopped"))
    return out


def down(settings: Settings, timeout: float = 20.0, only_apps: bool = False) -> list[str]:
    """Stop what `up` started (and the embedded PostgreSQL); returns the names stopped.

    `only_apps`: just the worker and the agent server.
    """
    stopped = []
    wanted = apps(settings) + ([] if only_apps else services(settings))
    for svc in wanted:  # the apps first: they use the services
        proc = _recorded_process(settings, svc.name)
        if proc is not None:
            _terminate_group(proc, timeout)
            stopped.append(svc.name)
        _pidfile(settings, svc.name).unlink(missing_ok=True)
    if not only_apps and not settings.database_url and stop_embedded_pg(settings):
        stopped.append("postgres")
    return stopped


def _terminate_group(proc: psutil.Process, timeout: float) -> None:
    tree = [proc, *proc.children(recursive=True)]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _url_var(name: str) -> str:
    return {
        "mlflow": "MLFLOW_TRACKING_URI",
        "prefect": "PREFECT_API_URL",
        "agent": "PYTHON_AGENT_URL",
    }[name]


def _redact(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
