"""Static checks of the container files (no Docker engine on CI machines)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from valifi.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_stack_services():
    services = _compose()["services"]
    assert {"postgres", "mlflow", "prefect", "seed", "worker", "agent"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            assert (context / "Dockerfile").is_file(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    assert "mlflow" in services["mlflow"]["environment"]["MLFLOW_ALLOWED_HOSTS"]


def _commands(cmd) -> list[list[str]]:
    """The commands a compose `command:` runs (`sh -c "a && exec b"` is two)."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    steps = [shlex.split(p) for p in argv[2].split("&&")] if argv[:2] == ["sh", "-c"] else [argv]
    return [step[1:] if step[0] == "exec" else step for step in steps]


def _parse(argv: list[str]) -> None:
    """Parse a `valifi` command line as the command would; raises on an unknown command
    or option."""
    group = typer.main.get_command(app)
    group.commands[argv[0]].make_context(argv[0], argv[1:])


def test_compose_commands_are_real_valifi_commands():
    seen = []
    for svc in _compose()["services"].values():
        for step in _commands(svc.get("command") or ["true"]):
            if step[0] == "valifi":
                _parse(step[1:])
                seen.append(step[1])
    assert {"seed-data", "deploy", "worker", "serve"} <= set(seen)
    with pytest.raises(Exception, match="no-such-option"):
        _parse(["serve", "--no-such-option"])


def test_the_long_running_apps_are_restarted_when_they_exit():
    """`valifi serve` exits 1 when an inference worker dies, trusting its supervisor."""
    services = _compose()["services"]
    for name in ("agent", "worker"):
        assert services[name].get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_mlflow_folder_is_deployment_files_not_a_package():
    assert (ROOT / "mlflow" / "Dockerfile").is_file()
    assert (ROOT / "mlflow" / "entrypoint.sh").is_file()
    assert not (ROOT / "mlflow" / "__init__.py").exists()


def test_prefect_yaml_defines_the_nightly_deployment():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["name"] == "nightly" and dep["entrypoint"] == "flows/pipeline.py:train"
    assert dep["schedules"][0]["cron"] == "0 2 * * *"
    assert dep["concurrency_limit"]["limit"] == 1
    assert dep["work_pool"]["name"] == "valifi-process"


def test_the_application_image_holds_every_package_of_the_project():
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in wanted["packages"]["find"]["include"]]
    assert packages and all(f"COPY {p} ./{p}" in text for p in packages), packages
    assert all((ROOT / p / "__init__.py").is_file() for p in packages)


# --- the Compose specification, checked offline ----------------------------------------

APPS = ("seed", "worker", "agent")  # services built from this project's image
LONG_RUNNING = ("postgres", "mlflow", "prefect", "agent")  # answer on a port: health-checked


def _spec(text: str):
    from compose_spec import PyCompose

    c = PyCompose.from_yaml(text)
    c.validate()
    return c


def test_the_compose_file_follows_the_compose_specification():
    c = _spec((ROOT / "docker-compose.yml").read_text())
    assert c.name == "valifi"  # the spec's top-level name (older parsers refuse it)
    assert set(c.service_names()) == set(_compose()["services"])


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ('ports: ["127.0.0.1:8000:8000"]', "ports: 8000", "ports"),
        ("condition: service_completed_successfully", "condition: when_ready", "condition"),
        ("interval: 10s", "interval: often", "interval"),
        ("services:", "service:", "services"),
    ],
)
def test_the_spec_parser_rejects_a_malformed_compose_file(old, new, why):
    text = (ROOT / "docker-compose.yml").read_text()
    assert old in text
    with pytest.raises(ValueError, match=why):
        _spec(text.replace(old, new, 1))


def test_app_environment_and_ports_match_the_settings(monkeypatch):
    from core.settings import Settings

    services = _compose()["services"]
    for name in APPS:
        env = services[name]["environment"]
        for key in list(os.environ):
            if key.startswith("VALIFI_") or key in env:
                monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        s = Settings(_env_file=None)
        assert s.database_url == env["DATABASE_URL"], name
        assert s.mlflow_tracking_uri == env["MLFLOW_TRACKING_URI"], name
        assert s.prefect_api_url == env["PREFECT_API_URL"], name
        assert s.python_agent_url == env["PYTHON_AGENT_URL"], name
        assert str(s.data_dir) == env["VALIFI_DATA_DIR"], name
    env = services["agent"]["environment"]
    # each URL names a service of this file on the port that service listens on
    listens = {
        "mlflow": _port_of((ROOT / "mlflow" / "entrypoint.sh").read_text(), r"--port (\d+)"),
        "prefect": _port_of(services["prefect"]["command"], r"--port (\d+)"),
        "agent": _port_of(services["agent"]["command"], r"--port (\d+)"),
        "postgres": 5432,
    }
    for key in ("DATABASE_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PYTHON_AGENT_URL"):
        parts = urlsplit(env[key])
        assert parts.port == listens[parts.hostname], key
    for name in ("mlflow", "prefect", "agent", "postgres"):
        published = [str(p).rsplit(":", 1)[-1] for p in services[name].get("ports", [])]
        assert published == [str(listens[name])], name
        health = " ".join(services[name]["healthcheck"]["test"])
        assert name == "postgres" or f":{listens[name]}/" in health, name


def _port_of(text: str, pattern: str) -> int:
    return int(re.search(pattern, text).group(1))


def test_health_checks_and_start_order():
    services = _compose()["services"]
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            want = "service_healthy" if dep in LONG_RUNNING else "service_completed_successfully"
            assert cond.get("condition") == want, f"{name} -> {dep}: {cond}"
    assert set(services["worker"]["depends_on"]) == {"postgres", "prefect", "mlflow", "seed"}
    assert set(services["agent"]["depends_on"]) == {"mlflow"}


def test_the_worker_serves_the_pool_of_the_deployment():
    from valifi.deploy import POOL, worker_command

    cmd = _compose()["services"]["worker"]["command"]
    assert [step for step in _commands(cmd) if step[0] == "valifi"][-1] == ["valifi", "worker"]
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["work_pool"]
    assert pool["name"] == POOL
    from core.settings import Settings

    argv, _ = worker_command(Settings(_env_file=None))
    assert argv[argv.index("--pool") + 1] == POOL


def test_models_travel_through_the_tracking_server_not_a_shared_disk():
    services = _compose()["services"]
    entry = (ROOT / "mlflow" / "entrypoint.sh").read_text()
    assert "--artifacts-destination" in entry and "--no-serve-artifacts" not in entry
    mlflow_volumes = {v.split(":")[0] for v in services["mlflow"]["volumes"]}
    for name in APPS:
        mounted = {str(v).split(":")[0] for v in services[name].get("volumes", [])}
        assert not mounted & mlflow_volumes, f"{name} mounts MLflow's store"
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow:")


def _torch_guard(variant: str) -> subprocess.CompletedProcess:
    """The Dockerfile's check of the torch it installed, run here against ours."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", "")
    run = next(line for line in text.splitlines() if line.startswith("RUN pip install"))
    assert "$TORCH_SPEC" in run and "${TORCH_INDEX_URL:+--index-url" in run
    guard = run.split("&& ", 1)[1]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "TORCH_VARIANT": variant, "PATH": path}
    return subprocess.run(["sh", "-c", guard], env=env, capture_output=True, text=True)


def test_the_image_build_fails_when_torch_is_not_the_variant_asked_for():
    import torch

    cpu_here = torch.version.cuda is None
    ok, wrong = ("cpu", "gpu") if cpu_here else ("gpu", "cpu")
    assert _torch_guard(ok).returncode == 0
    refused = _torch_guard(wrong)
    assert refused.returncode != 0
    assert f"TORCH_VARIANT={wrong}" in refused.stderr
    assert ("a CPU build" if cpu_here else "set TORCH_INDEX_URL") in refused.stderr
    args = _compose()["x-app-build"]["args"]
    assert args["TORCH_VARIANT"] == "${TORCH_VARIANT:-cpu}"
    for name in APPS:
        assert _compose()["services"][name]["build"]["args"] == args, name
