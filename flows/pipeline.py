"""The `train` flow: export → validate → train → evaluate → register → promote.

The flow only calls tasks. Tasks that touch the network or the database retry
with backoff (delays from settings); pure steps do not. Every run ends in a clear
state: Completed (promoted vN / rejected by the gate), Completed named "Skipped"
(insufficient data), or Failed with the reason (failed validation, errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.states import Completed

from flows.export import ExportSpec, InsufficientData, Manifest, export_snapshot
from flows.source import SourceError
from flows.validate import ValidationFailed, ValidationSpec, validate_snapshot
from valifi.settings import Settings

# Errors that another try cannot fix: the run fails at once with the reason.
PERMANENT = (SourceError, ValueError, ValidationFailed)


def _retry_unless_permanent(task, task_run, state) -> bool:
    return not isinstance(state.data, PERMANENT)


class ExportError(RuntimeError):
    """The database could not be read; the message says which and why."""


@dataclass
class ExportOutcome:
    snapshot: str | None  # None: skipped
    rows: int
    reason: str | None = None


def export_spec(
    settings: Settings,
    days: float | None = None,
    limit: int | None = None,
    min_rows: int | None = None,
) -> ExportSpec:
    return ExportSpec(
        table=settings.table,
        days=settings.export_days if days is None else days,
        limit=settings.export_limit if limit is None else limit,
        min_rows=settings.min_rows if min_rows is None else min_rows,
        columns=settings.columns,
    )


def validation_spec(settings: Settings, min_rows: int | None = None) -> ValidationSpec:
    return ValidationSpec(
        reward_min=settings.reward_min,
        reward_max=settings.reward_max,
        data_types=settings.data_types,
        max_null_reward_fraction=settings.max_null_reward_fraction,
        max_bad_payload_fraction=settings.max_bad_payload_fraction,
        min_rows=settings.min_rows if min_rows is None else min_rows,
    )


@task(name="export", retry_condition_fn=_retry_unless_permanent)
def export_task(url: str, spec: ExportSpec, out_root: Path) -> ExportOutcome:
    """Snapshot the table; too few rows is an outcome (skip), not an error."""
    import psycopg

    try:
        snap = export_snapshot(url, spec, out_root)
    except InsufficientData as exc:
        get_run_logger().warning("%s", exc)
        return ExportOutcome(None, 0, str(exc))
    except psycopg.Error as exc:
        raise ExportError(f"export from table {spec.table!r} failed: {exc}".strip()) from exc
    m = Manifest.read(snap)
    get_run_logger().info(
        "snapshot %s: %d rows (%d unscored), %s .. %s, sha256 %s",
        snap.name,
        m.rows,
        m.null_reward_rows,
        m.oldest,
        m.watermark,
        m.sha256[:12],
    )
    return ExportOutcome(str(snap), m.rows)


@task(name="validate")
def validate_task(snapshot: str, spec: ValidationSpec) -> str:
    result = validate_snapshot(Path(snapshot), spec)
    if not result.success:
        raise ValidationFailed(result)
    get_run_logger().info(
        "validation passed: %d expectations; docs %s", result.evaluated, result.docs
    )
    return result.docs or ""


@flow(name="train", log_prints=True)
def train(
    days: float | None = None,
    limit: int | None = None,
    min_rows: int | None = None,
):
    """Export the newest rows, validate them, then train, gate, register and promote."""
    from valifi.stack import database_url

    settings = Settings()
    delays = settings.retry_delays_s
    exporter = export_task.with_options(retries=len(delays), retry_delay_seconds=delays)
    outcome = exporter(
        database_url(settings),
        export_spec(settings, days, limit, min_rows),
        settings.snapshots_dir,
    )
    if outcome.snapshot is None:
        return Completed(name="Skipped", message=f"skipped: {outcome.reason}")
    validate_task(outcome.snapshot, validation_spec(settings, min_rows))
    return Completed(message=f"validated snapshot {Path(outcome.snapshot).name}")
