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
    assert {"postgres", "mlflow", "prefect"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            assert (context / "Dockerfile").is_file(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    assert "mlflow" in services["mlflow"]["environment"]["MLFLOW_ALLOWED_HOSTS"]


def test_compose_commands_are_real_valifi_commands():
    parser = build_parser()
    for svc in _compose()["services"].values():
        cmd = svc.get("command")
        if not cmd:
            continue
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        if argv[0] == "valifi":
            parser.parse_args(argv[1:])  # exits (fails the test) on an unknown command


def test_mlflow_folder_is_deployment_files_not_a_package():
    assert (ROOT / "mlflow" / "Dockerfile").is_file()
    assert (ROOT / "mlflow" / "entrypoint.sh").is_file()
    assert not (ROOT / "mlflow" / "__init__.py").exists()
