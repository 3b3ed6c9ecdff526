"""Settings for every entry point: environment, then `.env`, then defaults.

Read once at an entry point (`Settings()`), never at import time. The standard
variables keep their usual names (`DATABASE_URL`, `MLFLOW_TRACKING_URI`,
`PREFECT_API_URL`, `PYTHON_AGENT_URL`); the project's own knobs are `VALIFI_*`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _std(name: str) -> AliasChoices:
    """Accept the conventional variable name, and the field name for keyword init."""
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VALIFI_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # --- services -------------------------------------------------------------
    # None: use the embedded PostgreSQL under data_dir (started on demand).
    database_url: str | None = Field(None, validation_alias=_std("DATABASE_URL"))
    mlflow_tracking_uri: str = Field(
        "http://127.0.0.1:5000", validation_alias=_std("MLFLOW_TRACKING_URI")
    )
    prefect_api_url: str = Field(
        "http://127.0.0.1:4200/api", validation_alias=_std("PREFECT_API_URL")
    )
    python_agent_url: str = Field(
        "http://127.0.0.1:8000", validation_alias=_std("PYTHON_AGENT_URL")
    )

    # --- local stack ----------------------------------------------------------
    data_dir: Path = Path(".valifi")
    # Backend store of the MLflow server; None: SQLite under data_dir.
    mlflow_backend_store_uri: str | None = None
    stack_timeout_s: float = 120.0

    # --- source table -----------------------------------------------------------
    table: str = "bot_training_data"
    bots_table: str = "trading_bots"
    # Explicit column mapping for other schemas, e.g.
    # {"bot_id": "agent", "created_at": "ts"}; unset roles are detected.
    columns: dict[str, str] = Field(default_factory=dict)

    # --- export (defaults follow the original design) ---------------------------
    export_days: float = 7.0
    export_limit: int = 10_000
    min_rows: int = 100
    # Delays between the retries of tasks that touch the network or the database.
    retry_delays_s: list[float] = Field(default_factory=lambda: [2.0, 5.0, 15.0])

    # --- validation -----------------------------------------------------------------
    reward_min: float = -1.0
    reward_max: float = 1.0
    data_types: list[str] = Field(
        default_factory=lambda: ["market_data", "user_feedback", "strategy_result"]
    )
    max_null_reward_fraction: float = 0.2
    max_bad_payload_fraction: float = 0.01

    # --- training and the gate ------------------------------------------------------
    model_name: str = "valifi-agent"
    train_devices: int = 1
    train_num_nodes: int = 1
    train_max_epochs: int | None = None  # None: the model's default
    # Report true policy values from the synthetic generator (data from seed-data only).
    synthetic_ground_truth: bool = False
    synthetic_drift_at: str | None = None
    gate_auc_min: float = 0.6
    gate_rmse_ratio_max: float = 0.95
    gate_max_regression: float = 0.0
    gate_confidence: float = 0.95

    # --- deployment, watch after promotion, notifications ---------------------------
    schedule_timezone: str = "UTC"
    worker_poll_s: float = 10.0
    late_run_grace_s: float = 3600.0  # a scheduled run this late yields to a newer one
    watch_window_s: float = 300.0  # 0: no watch after a promotion
    watch_poll_s: float = 5.0
    watch_max_error_rate: float = 0.02
    watch_max_p99_ratio: float = 2.0
    watch_min_requests: int = 20
    notify_webhook_url: str | None = None

    # --- the agent server -------------------------------------------------------------
    serve_host: str = "127.0.0.1"
    serve_workers: int = 2  # inference worker processes
    serve_api_servers: int = 1  # HTTP server processes
    max_batch_size: int = 16
    batch_timeout_s: float = 0.01
    poll_interval_s: float = 10.0  # how often each worker checks the Production alias
    request_timeout_s: float = 30.0
    max_payload_bytes: int = 64 * 1024
    api_key: str | None = None  # when set, /predict needs header X-API-Key

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().absolute()

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    def local_port(self, url: str) -> int | None:
        """The port of `url` when it names this machine, else None (an external service)."""
        parts = urlsplit(url)
        if parts.hostname in ("127.0.0.1", "localhost", "::1"):
            return parts.port or (443 if parts.scheme == "https" else 80)
        return None
