"""Static checks of the container files (no Docker engine on CI machines)."""

import shlex
from pathlib import Path

import yaml

from valifi.cli import build_parser

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


def test_compose_commands_are_real_valifi_commands():
    parser = build_parser()
    seen = []
    for svc in _compose()["services"].values():
        for step in _commands(svc.get("command") or ["true"]):
            if step[0] == "valifi":
                parser.parse_args(step[1:])  # exits (fails the test) on an unknown command
                seen.append(step[1])
    assert {"seed-data", "deploy", "worker", "serve"} <= set(seen)


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
