import os
from pathlib import Path

import pytest

from core.settings import Settings


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
        "DATABASE_URL=postgresql://u@db/x\nVALIFI_EXPORT_TABLE=from_dotenv\nVALIFI_DATA_DIR=/srv/v\n"
    )
    s = Settings()
    assert s.database_url == "postgresql://u@db/x"
    assert s.export.table == "from_dotenv"
    assert s.data_dir == Path("/srv/v")


def test_environment_overrides_dotenv(in_tmp, monkeypatch):
    (in_tmp / ".env").write_text(
        "VALIFI_EXPORT_TABLE=from_dotenv\nMLFLOW_TRACKING_URI=http://a:1\n"
    )
    monkeypatch.setenv("VALIFI_EXPORT_TABLE", "from_env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://b:2")
    s = Settings()
    assert (s.export.table, s.mlflow_tracking_uri) == ("from_env", "http://b:2")


def test_arguments_override_environment(in_tmp, monkeypatch):
    monkeypatch.setenv("VALIFI_EXPORT_TABLE", "from_env")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/x")
    s = Settings(export={"table": "from_arg"}, database_url="postgresql://arg/x")
    assert (s.export.table, s.database_url) == ("from_arg", "postgresql://arg/x")


def test_column_mapping_from_json_env(in_tmp, monkeypatch):
    monkeypatch.setenv("VALIFI_EXPORT_COLUMNS", '{"bot_id": "agent", "created_at": "ts"}')
    assert Settings().export.columns == {"bot_id": "agent", "created_at": "ts"}


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


def test_each_section_is_the_spec_its_stage_takes_with_its_defaults_written_once(in_tmp):
    from core import settings as core

    s = Settings()
    for name, spec in [
        ("export", core.ExportSpec),
        ("validation", core.ValidationSpec),
        ("train", core.TrainSpec),
        ("gate", core.GateSpec),
        ("watch", core.WatchSpec),
        ("serve", core.ServeSpec),
    ]:
        section = getattr(s, name)
        assert type(section) is spec
        assert section == spec()  # the spec's own defaults are the settings' defaults


def test_section_fields_come_from_valifi_section_field_variables(in_tmp, monkeypatch):
    monkeypatch.setenv("VALIFI_GATE_MARGIN", "0.2")
    monkeypatch.setenv("VALIFI_WATCH_WINDOW_S", "42")
    monkeypatch.setenv("VALIFI_SERVE_WORKERS", "3")
    monkeypatch.setenv("VALIFI_TRAIN_TIMEOUT_S", "60")
    monkeypatch.setenv("VALIFI_VALIDATION_DATA_TYPES", '["a", "b"]')
    monkeypatch.setenv("VALIFI_SERVER_STARTED_AT", "123")  # not a field of the serve section
    s = Settings()
    assert (s.gate.margin, s.watch.window_s, s.serve.workers) == (0.2, 42.0, 3)
    assert (s.train.timeout_s, s.validation.data_types) == (60.0, ["a", "b"])


def test_a_misspelt_section_setting_is_an_error(in_tmp, monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("VALIFI_GATE_MARGN", "0.2")
    with pytest.raises(ValidationError, match="margn"):
        Settings()


def test_members_reach_the_training_command_and_fewer_than_one_is_refused(in_tmp, monkeypatch):
    from pydantic import ValidationError

    from flows.training import train_options as train_args

    assert "--members" not in train_args(Settings().train)
    monkeypatch.setenv("VALIFI_TRAIN_MEMBERS", "3")
    args = train_args(Settings().train)
    assert args[args.index("--members") + 1] == "3"
    monkeypatch.setenv("VALIFI_TRAIN_MEMBERS", "0")
    with pytest.raises(ValidationError, match="members"):
        Settings()


def test_pessimism_reaches_the_training_command_and_a_negative_one_is_refused(in_tmp, monkeypatch):
    from pydantic import ValidationError

    from flows.training import train_options as train_args

    assert "--pessimism" not in train_args(Settings().train)  # the model's default
    monkeypatch.setenv("VALIFI_TRAIN_PESSIMISM", "0")
    args = train_args(Settings().train)
    assert args[args.index("--pessimism") + 1] == "0.0"
    for bad in ("-1", "nan"):
        monkeypatch.setenv("VALIFI_TRAIN_PESSIMISM", bad)
        with pytest.raises(ValidationError, match="pessimism"):
            Settings()


def test_every_training_setting_is_declared_once_and_reaches_the_command(in_tmp, monkeypatch):
    """A field of the training's configs is a setting (VALIFI_TRAIN_<FIELD>), an option
    of `python -m model.train`, and an option of the flow's launch, with one default."""
    from dataclasses import fields

    from flows.training import train_options
    from model import config
    from model.train import parse_args

    spec = Settings().train
    for cls in config.CONFIGS:
        for f in fields(cls):
            assert getattr(spec, f.name) == f.default, f.name  # the default, once
    assert train_options(spec) == ["--no-progress"]  # nothing else differs
    monkeypatch.setenv("VALIFI_TRAIN_HALF_LIFE_DAYS", "0")
    monkeypatch.setenv("VALIFI_TRAIN_SHUFFLE_REWARDS", "true")
    monkeypatch.setenv("VALIFI_TRAIN_SYNTHETIC_GROUND_TRUTH", "true")  # the earlier name
    options = train_options(Settings().train)
    assert options == [
        "--no-progress",
        "--ground-truth",
        "synthetic",
        "--shuffle-rewards",
        "--half-life-days",
        "0.0",
    ]
    launch, recipe = config.parse(parse_args(["--snapshot", "s", "--out", "o", *options]))
    assert (recipe.half_life_days, recipe.shuffle_rewards) == (0.0, True)
    assert (launch.ground_truth, launch.progress) == ("synthetic", False)


def test_a_training_run_outside_the_flow_has_the_flows_settings(in_tmp, monkeypatch):
    """`valifi.experiments.train_command` (the tests' and benches' trainings) launches as
    the flow would: with VALIFI_TRAIN_THREADS, two parallel trainings on two cores do
    not each take both (they took several times as long)."""
    from valifi.experiments import train_command

    monkeypatch.setenv("VALIFI_TRAIN_THREADS", "1")
    monkeypatch.setenv("VALIFI_TRAIN_SEED", "4")
    cmd = train_command(in_tmp / "snap", in_tmp / "out", None, "--max-epochs", "2")
    assert cmd[cmd.index("--threads") + 1] == "1"
    assert cmd[cmd.index("--seed") + 1] == "4"
    cmd = train_command(in_tmp / "snap", in_tmp / "out", 7)
    assert cmd[cmd.index("--seed") + 1] == "7" and cmd.count("--seed") == 1
