import os
from pathlib import Path

import pytest

from valifi.settings import Settings


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith("VALIFI_") or var in (
            "DATABASE_URL",
            "MLFLOW_TRACKING_URI",
            "PREFECT_API_URL",
            "PYTHON_AGENT_URL",
        ):
            monkeypatch.delenv(var)
    return tmp_path


def test_defaults_without_env_or_dotenv(in_tmp):
    s = Settings()
    assert s.database_url is None  # embedded PostgreSQL
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert s.prefect_api_url == "http://127.0.0.1:4200/api"
    assert s.python_agent_url == "http://127.0.0.1:8000"
    assert s.data_dir == in_tmp / ".valifi"


def test_dotenv_overrides_defaults(in_tmp):
    (in_tmp / ".env").write_text(
        "DATABASE_URL=postgresql://u@db/x\nVALIFI_TABLE=from_dotenv\nVALIFI_DATA_DIR=/srv/v\n"
    )
    s = Settings()
    assert s.database_url == "postgresql://u@db/x"
    assert s.table == "from_dotenv"
    assert s.data_dir == Path("/srv/v")


def test_environment_overrides_dotenv(in_tmp, monkeypatch):
    (in_tmp / ".env").write_text("VALIFI_TABLE=from_dotenv\nMLFLOW_TRACKING_URI=http://a:1\n")
    monkeypatch.setenv("VALIFI_TABLE", "from_env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://b:2")
    s = Settings()
    assert (s.table, s.mlflow_tracking_uri) == ("from_env", "http://b:2")


def test_arguments_override_environment(in_tmp, monkeypatch):
    monkeypatch.setenv("VALIFI_TABLE", "from_env")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/x")
    s = Settings(table="from_arg", database_url="postgresql://arg/x")
    assert (s.table, s.database_url) == ("from_arg", "postgresql://arg/x")


def test_column_mapping_from_json_env(in_tmp, monkeypatch):
    monkeypatch.setenv("VALIFI_COLUMNS", '{"bot_id": "agent", "created_at": "ts"}')
    assert Settings().columns == {"bot_id": "agent", "created_at": "ts"}


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("http://127.0.0.1:5000", 5000),
        ("http://localhost:4200/api", 4200),
        ("https://mlflow.example.com", None),
        ("http://10.0.0.5:5000", None),
    ],
)
def test_local_port_tells_managed_from_external(in_tmp, url, port):
    assert Settings().local_port(url) == port
