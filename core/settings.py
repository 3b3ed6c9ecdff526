"""Settings for every entry point: environment, then `.env`, then defaults.

One `Settings`, read once at an entry point (`Settings()`), never at import time.
Its nested sections *are* the specs the stages take (`settings.export` is the
`ExportSpec` the export runs with), so every default is written once, here.

The standard variables keep their usual names (`DATABASE_URL`,
`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`, `PYTHON_AGENT_URL`); the project's own
knobs are `VALIFI_*`, and a section's field is `VALIFI_<SECTION>_<FIELD>`:
`VALIFI_GATE_MARGIN` sets `settings.gate.margin`, `VALIFI_SERVE_WORKERS` sets
`settings.serve.workers`.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.snapshot import DATA_TYPES

ALIAS = "Production"  # the registry alias the server follows and the gate moves
CHALLENGER = "Challenger"  # the alias the server scores in shadow beside Production


class ExportSpec(BaseModel):
    """What to export; defaults follow the original design (7 days, newest 10,000)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error

    table: str = "bot_training_data"
    bots_table: str = "trading_bots"  # the app layout's bot names
    # Explicit column mapping for other schemas, e.g. {"bot_id": "agent", "created_at": "ts"};
    # unset roles are detected from the catalog.
    columns: dict[str, str] = Field(default_factory=dict)
    days: float = 7.0
    limit: int = 10_000
    min_rows: int = 100  # fewer rows than this: the run is skipped, not failed
    until: datetime | None = None  # end of the window (UTC); None: now
    chunk_bytes: int = 4 << 20  # rows read and written per Arrow batch (about this size)
    # The zone a `timestamp without time zone` column's values are in. None: the
    # database's own TimeZone setting (what `DEFAULT now()` wrote them in).
    naive_timezone: str | None = None
    max_payload_bytes: int = 4 << 20  # a larger input or output payload is set aside
    # A served decision (agent_decisions) is trained on once its reward wait has passed,
    # with the reward recorded within that wait (POST /reward, or a bot's row naming the
    # decision); one still inside the wait is counted as waiting and left for a later
    # run, and a reward that comes after it is stored but not trained on.
    reward_wait_s: float = Field(3600.0, ge=0)
    # A decision without a reward after the wait: left out (None), or trained on with
    # this reward. Left out by default: a made-up reward would pull every late-scored
    # action towards it, and leaving them out biases nothing unless rewards go missing
    # more often for some actions than for others (the manifest counts them).
    missing_reward: float | None = None

    def window(self) -> tuple[datetime, datetime]:
        until = self.until or datetime.now(UTC)
        until = until if until.tzinfo else until.replace(tzinfo=UTC)
        return until - timedelta(days=self.days), until


class ValidationSpec(BaseModel):
    """The expectation suite's limits (the minimum row count is the export's)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error

    reward_min: float = -1.0
    reward_max: float = 1.0
    data_types: list[str] = Field(default_factory=lambda: list(DATA_TYPES))
    max_null_reward_fraction: float = 0.2
    max_bad_payload_fraction: float = 0.01
    # The share of rows of any one bot, or any one data type, may move by at most this
    # much (absolute, 0..1) from the previous snapshot that passed validation: a bot
    # whose logging stopped, or one flooding the table, fails the run. 1.0 turns it off.
    # A real change is accepted once: `valifi validate SNAPSHOT --accept --reason ...`.
    max_share_change: float = 0.25
    # When the shares alone fail, a run waits this long for someone to accept the new
    # mix in the Prefect UI (resume the paused run with accept and a reason) before it
    # fails; 0: it fails at once (the run holds the one-at-a-time lock while it waits).
    approval_wait_s: float = Field(0.0, ge=0)


class GateSpec(BaseModel):
    """The promotion gate (see flows/gate.py and the README for the rule)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error

    auc_min: float = 0.6  # ROC AUC of the score against reward > 0
    rmse_ratio_max: float = 0.95  # RMSE must beat predicting the training mean by 5%
    # Non-inferiority margin, relative to the champion's holdout MSE: promote only when
    # the upper CI bound of (challenger - champion) MSE lies below margin x champion MSE.
    margin: float = 0.10
    confidence: float = 0.95
    bootstrap: int = 2000
    min_holdout_rows: int = 200  # a smaller holdout cannot decide: rejected
    # Also require the doubly-robust estimate of the policy's value not to fall below
    # the champion's by more than `margin` x the holdout rewards' standard deviation
    # (lower CI bound of challenger - champion). None: only when both estimates are
    # well conditioned, and when the interval is wider than the margin on either side
    # only a loss the interval shows rejects; True: always the lower bound (a poorly
    # conditioned or imprecise estimate rejects); False: never.
    value_check: bool | None = None
    ope_min_ess: float = 100.0  # effective sample size below this: poorly conditioned
    ope_bootstrap: int = 500
    # Where a model that passes the gate goes: `production` (at once), or `shadow`: on the
    # `Challenger` alias, scored in shadow on live traffic, and moved to Production by a
    # later run (or `valifi promote --from-shadow`) only when its doubly-robust value on
    # the live decisions, minus Production's, has its lower bound above -margin x the
    # rewards' standard deviation, from at least `shadow_min_ess` decisions' worth of
    # evidence (effective sample size).
    promote_via: Literal["production", "shadow"] = "production"
    # a Challenger not shown non-inferior within this many days is taken off the alias
    shadow_max_days: float = Field(7.0, gt=0)
    # The live evidence a promotion from the shadow needs: its effective sample size.
    # Lower than `ope_min_ess`: the live decisions' probabilities are the ones used,
    # not estimated (measured: the live interval held the true difference in every
    # closed-loop run, with effective sample sizes from 33 up).
    shadow_min_ess: float = Field(50.0, ge=0)


class WatchSpec(BaseModel):
    """The watch of a freshly promoted version on the agent server."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error

    window_s: float = 300.0  # 0: no watch after a promotion
    poll_s: float = 5.0
    converge_s: float = 120.0  # every worker must serve the new version within this
    max_error_rate: float = 0.02  # share of 5xx answers
    max_p99_ratio: float = 2.0  # new p99 over previous p99
    min_p99_s: float = 0.25  # below this p99 never counts as a breach
    min_requests: int = 20  # fewer answers than this: no judgement on error rate


class _TrainSpecBase(BaseModel):
    """How the flow launches training (`python -m model.train`): every field of the
    training's own configs (model.config: LaunchConfig, TrainConfig), with their
    defaults and limits, plus how long the flow lets it run."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error

    timeout_s: float = 3600.0  # a training process running longer is killed
    lock_wait_s: float = 6 * 3600.0  # how long a run waits for another run to finish

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, values):
        """VALIFI_TRAIN_SYNTHETIC_GROUND_TRUTH=true and _SYNTHETIC_DRIFT_AT, as earlier."""
        if isinstance(values, dict):
            values = dict(values)
            if "synthetic_ground_truth" in values:
                truth = str(values.pop("synthetic_ground_truth")).lower()
                values.setdefault(
                    "ground_truth", "synthetic" if truth in ("1", "true", "yes") else "none"
                )
            if "synthetic_drift_at" in values:
                values.setdefault("drift_at", values.pop("synthetic_drift_at"))
        return values

    @model_validator(mode="after")
    def _valid_configs(self):
        self.configs()  # the configs' own checks, with their messages
        return self

    def configs(self):
        """(LaunchConfig, TrainConfig) of these settings."""
        from model.config import CONFIGS

        return tuple(
            cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})
            for cls in CONFIGS
        )


def _with_fields(name: str, base: type[BaseModel], configs) -> type[BaseModel]:
    """`base` with a field for every field of the dataclasses `configs` (model.config's
    declarations: type, default, help, limits)."""
    from model.config import annotations

    fields = {
        f.name: _config_field(f, annotations(cls)[f.name])
        for cls in configs
        for f in dataclasses.fields(cls)
    }
    return create_model(name, __base__=base, __module__=__name__, **fields)


def _config_field(f: dataclasses.Field, kind) -> tuple:
    """A settings field for one field of a training config: its type, default, help and
    limits, as the config declares them."""
    meta = f.metadata
    if meta.get("choices"):
        kind = Literal[meta["choices"]]
    extra = {"allow_inf_nan": False} if meta.get("ge") is not None else {}
    return (
        kind,
        Field(f.default, ge=meta.get("ge"), le=meta.get("le"), description=meta["help"], **extra),
    )


def _specs():
    from model.config import CONFIGS, Exploration

    return (
        _with_fields("TrainSpec", _TrainSpecBase, CONFIGS),
        _with_fields("ServeSpec", _ServeSpecBase, [Exploration]),
    )


class _ServeSpecBase(BaseModel):
    """The agent server; with every field of the served policy's exploration
    (model.config.Exploration)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error

    host: str = "127.0.0.1"
    workers: int = 2  # inference worker processes
    # torch threads in each worker; None: the cores shared out (cores // workers, at least 1)
    threads_per_worker: int | None = None
    api_servers: int = 1  # HTTP server processes
    max_batch_size: int = 16
    # once a batch has one request, how long it waits for more; 0: it takes what is
    # already waiting (batches still grow under load, and a lone request never waits)
    batch_timeout_s: float = 0.0
    poll_interval_s: float = 10.0  # how often each worker checks the Production alias
    request_timeout_s: float = 30.0
    max_payload_bytes: int = 64 * 1024
    api_key: str | None = None  # when set, /predict needs header X-API-Key
    # a line per request in the server's log (uvicorn's access log); turning it off
    # made no difference the serving bench could measure (every request is counted in
    # /metrics either way)
    access_log: bool = True
    # how requests and answers cross between the HTTP process and the workers:
    # "pipes" (serving.transport: a pipe each way, no manager process in the path) or
    # "litserve" (LitServe's own Manager queues, as shipped)
    transport: Literal["pipes", "litserve"] = "pipes"
    # where an answer becomes JSON: "worker" (rendered once there, labelled in headers
    # for the metrics: the HTTP process sends it as it is) or "http" (FastAPI's encoder
    # in the HTTP process, as LitServe does it)
    render: Literal["worker", "http"] = "worker"
    # Every execute decision is logged to the database (`agent_decisions`) by each
    # worker in the background: batches of up to `log_batch`, a batch written at most
    # `log_flush_s` after its first decision came (one transaction per decision would
    # cost a light load most of the log's CPU); while the database is unreachable they
    # go to files under data_dir/decision-spool and are written when it returns. At
    # most `log_queue` wait in memory (more go to the spool at once). False: nothing
    # is logged.
    log_decisions: bool = True
    log_batch: int = Field(256, ge=1)
    log_flush_s: float = Field(0.2, gt=0)
    log_queue: int = Field(10_000, ge=1)
    log_retry_s: float = Field(2.0, gt=0)  # between tries while the database is down
    # The Challenger alias, when set, is scored in shadow on this share of the execute
    # decisions (drawn from each decision id), after their answers have left: freely
    # while no request comes, else within `shadow_budget` of each worker's time; the
    # decisions it has no time for are logged as skipped (agent_shadow). 0: no shadow.
    shadow_share: float = Field(1.0, ge=0, le=1)
    shadow_budget: float = Field(0.05, ge=0, le=1)
    shadow_max_pending: int = Field(256, ge=1)  # decisions waiting for the shadow, at most

    def policy(self):
        """The exploration these settings ask for (model.config.Exploration)."""
        from model.config import Exploration

        return Exploration(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(Exploration)}
        )


def _std(name: str) -> AliasChoices:
    """Accept the conventional variable name, and the field name for keyword init."""
    return AliasChoices(name, name.lower())


TrainSpec, ServeSpec = _specs()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VALIFI_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
        populate_by_name=True,
    )

    # --- services -------------------------------------------------------------
    # None: the `valifi` command uses an embedded PostgreSQL under data_dir.
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

    # --- the registered model and the stages ------------------------------------
    model_name: str = "valifi-agent"
    # Delays between the retries of tasks that touch the network or the database.
    retry_delays_s: list[float] = Field(default_factory=lambda: [2.0, 5.0, 15.0])
    export: ExportSpec = Field(default_factory=ExportSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    watch: WatchSpec = Field(default_factory=WatchSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    # --- deployment and notifications ------------------------------------------------
    schedule_timezone: str = "UTC"
    worker_poll_s: float = 10.0
    late_run_grace_s: float = 3600.0  # a scheduled run this late yields to a newer one
    notify_webhook_url: str | None = None

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

    @property
    def serving_cache(self) -> Path:
        return self.data_dir / "serving-cache" / self.model_name

    def local_port(self, url: str) -> int | None:
        """The port of `url` when it names this machine, else None (an external service)."""
        parts = urlsplit(url)
        if parts.hostname in ("127.0.0.1", "localhost", "::1"):
            return parts.port or (443 if parts.scheme == "https" else 80)
        return None
