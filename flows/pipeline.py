"""The `train` flow: export → validate → train → evaluate → register → promote.

The flow only calls tasks. Tasks that touch the network or the database retry
with backoff (delays from settings); pure steps do not. Every run ends in a clear
state: Completed (promoted vN / rejected by the gate), Completed named "Skipped"
(insufficient data), or Failed with the reason (failed validation, errors).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task
from prefect.states import Completed

from flows import registry
from flows.export import ExportSpec, InsufficientData, Manifest, export_snapshot
from flows.gate import GateSpec, decide
from flows.source import SourceError
from flows.summary import render
from flows.validate import ValidationFailed, ValidationSpec, validate_snapshot
from flows.watch import WatchSpec, watch
from valifi.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

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


def gate_spec(settings: Settings) -> GateSpec:
    return GateSpec(
        auc_min=settings.gate_auc_min,
        rmse_ratio_max=settings.gate_rmse_ratio_max,
        max_regression=settings.gate_max_regression,
        confidence=settings.gate_confidence,
    )


@task(name="train")
def train_task(snapshot: str, out: Path, args: list[str]) -> str:
    """Train in a process of its own (`python -m model.train`), so DDP can launch ranks."""
    cmd = [
        sys.executable,
        "-m",
        "model.train",
        "--snapshot",
        snapshot,
        "--out",
        str(out),
        "--no-progress",
        *args,
    ]
    get_run_logger().info("training: %s", " ".join(cmd[1:]))
    Path(out).mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (Path(out) / "train.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"training failed (exit {r.returncode}): {tail}")
    get_run_logger().info("trained: %s", r.stdout.strip().splitlines()[-1])
    return str(out)


@task(name="evaluate", retry_condition_fn=_retry_unless_permanent)
def evaluate_task(
    tracking_uri: str, train_out: str, snapshot: str, spec: GateSpec, model_name: str
) -> dict:
    """Score the challenger and the current champion on the same holdout; apply the gate."""
    from model.artifact import load
    from model.evaluation import evaluate, per_row
    from model.module import read_snapshot, temporal_split

    result = json.loads((Path(train_out) / "result.json").read_text())
    train_cfg = result["config"]["train"]
    df = read_snapshot(Path(snapshot))
    train_df, _, holdout = temporal_split(
        df, train_cfg["val_fraction"], train_cfg["holdout_fraction"]
    )
    train_mean = float(train_df["reward"].mean())
    challenger = load(Path(train_out) / "artifact")
    new_metrics = evaluate(challenger, holdout, train_mean)
    old = registry.champion(registry.client(tracking_uri), model_name)
    if old is None:
        decision = decide(spec, new_metrics, per_row(challenger, holdout)["sq_err"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            champ = load(registry.download(tracking_uri, old.version, Path(tmp), model_name))
            decision = decide(
                spec,
                new_metrics,
                per_row(challenger, holdout)["sq_err"],
                evaluate(champ, holdout, train_mean),
                per_row(champ, holdout)["sq_err"],
                old.version,
            )
    get_run_logger().info("gate: %s", decision.summary())
    return decision.to_dict() | {"summary": decision.summary()}


@task(name="register", retries=2, retry_delay_seconds=[2, 10])
def register_task(
    tracking_uri: str, train_out: str, snapshot: str, gate: dict, model_name: str
) -> str:
    m = Manifest.read(Path(snapshot))
    result = json.loads((Path(train_out) / "result.json").read_text())
    lineage = {
        "snapshot_sha256": m.sha256,
        "snapshot_rows": m.rows,
        "window_since": m.window["since"],
        "window_until": m.window["until"],
        "watermark": m.watermark,
        "source_layout": m.layout,
        "git_commit": registry.git_commit(),
        "config": json.dumps({k: result["config"][k] for k in ("model", "train", "trainer")}),
        "gate_decision": "pass" if gate["passed"] else "reject",
        "gate_reasons": "; ".join(gate["reasons"]),
        "flow_run": _flow_run_name(),
    }
    mv = registry.log_and_register(
        tracking_uri, Path(train_out), Path(snapshot), gate, lineage, model_name
    )
    get_run_logger().info("registered %s v%s", model_name, mv.version)
    base = tracking_uri.rstrip("/")
    exp = registry.client(tracking_uri).get_run(mv.run_id).info.experiment_id
    return {
        "name": model_name,
        "version": mv.version,
        "run_id": mv.run_id,
        "version_url": f"{base}/#/models/{model_name}/versions/{mv.version}",
        "run_url": f"{base}/#/experiments/{exp}/runs/{mv.run_id}",
    }


@task(name="load-check")
def load_check_task(tracking_uri: str, version: str, model_name: str) -> str:
    return registry.load_check(tracking_uri, version, model_name)


@task(name="promote", retries=2, retry_delay_seconds=[2, 10])
def promote_task(tracking_uri: str, version: str, reason: str, model_name: str) -> dict:
    c = registry.client(tracking_uri)
    return registry.move_alias(
        c, version, reason, f"prefect:{_flow_run_name()}", "promote", model_name
    )


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"train/{flow_run.name}" if flow_run.name else "train"


def _train_args(
    settings: Settings,
    devices: int | None,
    num_nodes: int | None,
    max_epochs: int | None,
    extra: list[str],
) -> list[str]:
    args = [
        "--devices",
        str(devices or settings.train_devices),
        "--num-nodes",
        str(num_nodes or settings.train_num_nodes),
    ]
    epochs = max_epochs or settings.train_max_epochs
    if epochs:
        args += ["--max-epochs", str(epochs)]
    if settings.synthetic_ground_truth:
        args += ["--ground-truth", "synthetic"]
        if settings.synthetic_drift_at:
            args += ["--drift-at", settings.synthetic_drift_at]
    return args + list(extra)


@task(name="watch", retries=0)
def watch_task(
    agent_url: str,
    version: str,
    previous: str | None,
    spec: WatchSpec,
    tracking_uri: str,
    model_name: str,
) -> dict:
    """Watch the new version on the server; move Production back if it breaches."""
    logger = get_run_logger()
    try:
        httpx.get(f"{agent_url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        logger.warning("no agent server answering at %s (%s): nothing to watch", agent_url, exc)
        return {"watched": False, "reason": f"no agent server at {agent_url}"}
    result = watch(agent_url, version, previous, spec, logger.info)
    out = {"watched": True, **result.to_dict(), "rolled_back_to": None}
    if result.breached and previous:
        record = registry.rollback(
            tracking_uri,
            f"automatic rollback of v{version}: {result.reason}",
            to=previous,
            by=f"prefect:{_flow_run_name()}",
            name=model_name,
        )
        out["rolled_back_to"] = record["to"]
        logger.error("rolled back v%s -> v%s: %s", version, previous, result.reason)
    return out


@task(name="superseded")
def superseded_task(grace_s: float) -> str | None:
    """For a late scheduled run: the newer scheduled run that makes it pointless, if any.

    After an outage the worker finds every missed nightly run at once; only the
    newest one trains, the older ones end as skipped.
    """
    from prefect.runtime import deployment as this_deployment
    from prefect.runtime import flow_run

    scheduled, deployment = flow_run.scheduled_start_time, this_deployment.id
    if scheduled is None or deployment is None:
        return None
    now = datetime.now(UTC)
    if (now - scheduled).total_seconds() < grace_s:
        return None
    newer = asyncio.run(_newer_runs(deployment, scheduled, now, flow_run.id))
    return newer[0] if newer else None


async def _newer_runs(deployment_id, after: datetime, before: datetime, me) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(after_=after, before_=before)
            ),
        )
    return [
        r.name
        for r in runs
        if str(r.id) != str(me)
        and r.expected_start_time
        and r.expected_start_time > after
        and r.auto_scheduled
    ]


def _publish(summary: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(
            render(summary),
            key="train-summary",
            description=f"train run: {summary.get('decision')}",
        )
    except Exception as exc:  # a summary must never hide the run's own outcome
        get_run_logger().warning("could not publish the run summary: %s", exc)


@flow(name="train", log_prints=True)
def train(
    days: float | None = None,
    limit: int | None = None,
    min_rows: int | None = None,
    devices: int | None = None,
    num_nodes: int | None = None,
    max_epochs: int | None = None,
    train_args: list[str] | None = None,
):
    """Export the newest rows, validate them, train, gate against the champion, register,
    check that the registered version loads, promote it when the gate passes, and watch
    it on the agent server (rolling back when it misbehaves). Publishes a summary.

    `train_args` go to `python -m model.train` as they are (e.g. ["--preset", "large"]).
    """
    settings = Settings()
    summary: dict = {}
    try:
        state = _train(
            settings,
            summary,
            days,
            limit,
            min_rows,
            devices,
            num_nodes,
            max_epochs,
            train_args or [],
        )
        summary["decision"] = f"{state.name}: {state.message}"
        return state
    except BaseException as exc:
        summary["decision"] = "Failed"
        summary["error"] = str(exc)[:3000]
        raise
    finally:
        _publish(summary)


def _train(settings, summary, days, limit, min_rows, devices, num_nodes, max_epochs, train_args):
    from valifi.stack import database_url

    if newer := superseded_task(settings.late_run_grace_s):
        return Completed(
            name="Skipped", message=f"skipped: superseded by the newer scheduled run {newer}"
        )
    delays = settings.retry_delays_s
    exporter = export_task.with_options(retries=len(delays), retry_delay_seconds=delays)
    outcome = exporter(
        database_url(settings),
        export_spec(settings, days, limit, min_rows),
        settings.snapshots_dir,
    )
    if outcome.snapshot is None:
        return Completed(name="Skipped", message=f"skipped: {outcome.reason}")
    summary["snapshot"] = asdict(Manifest.read(Path(outcome.snapshot)))
    summary["validation"] = "failed (see the error)"
    docs = validate_task(outcome.snapshot, validation_spec(settings, min_rows))
    summary["validation"] = f"passed; Data Docs: `{docs}`"
    out = settings.runs_dir / f"{Path(outcome.snapshot).name}-{uuid.uuid4().hex[:8]}"
    args = _train_args(settings, devices, num_nodes, max_epochs, train_args)
    train_out = train_task(outcome.snapshot, out, args)
    summary["training"] = json.loads((Path(train_out) / "result.json").read_text())
    uri, name = settings.mlflow_tracking_uri, settings.model_name
    gate = evaluate_task.with_options(retries=len(delays), retry_delay_seconds=delays)(
        uri, train_out, outcome.snapshot, gate_spec(settings), name
    )
    summary["gate"] = gate
    reg = register_task(uri, train_out, outcome.snapshot, gate, name)
    summary["registry"] = reg
    version = reg["version"]
    if not gate["passed"]:
        return Completed(
            name="Rejected",
            message=f"rejected by the gate (v{version} registered, not promoted): "
            + "; ".join(gate["reasons"]),
        )
    load_check_task(uri, version, name)
    move = promote_task(uri, version, gate["summary"], name)
    promoted = f"promoted v{version}: " + "; ".join(gate["reasons"])
    if settings.watch_window_s <= 0:
        return Completed(message=promoted)
    watched = watch_task(
        settings.python_agent_url, version, move["from"], watch_spec(settings), uri, name
    )
    summary["watch"] = (
        f"rolled back to v{watched['rolled_back_to']}: {watched['reason']}"
        if watched.get("rolled_back_to")
        else f"watched: {watched.get('reason')}"
    )
    if watched.get("rolled_back_to"):
        return Completed(
            name="RolledBack",
            message=f"v{version} promoted, then rolled back to "
            f"v{watched['rolled_back_to']}: {watched['reason']}",
        )
    return Completed(message=promoted)


@flow(name="watch-promotion", log_prints=True)
def watch_promotion(version: str, previous: str | None = None, window_s: float | None = None):
    """Watch `version` on the agent server (as `train` does after a promotion) and move
    Production back to `previous` if it breaches the thresholds."""
    settings = Settings()
    spec = watch_spec(settings)
    if window_s is not None:
        spec.window_s = window_s
    watched = watch_task(
        settings.python_agent_url,
        version,
        previous,
        spec,
        settings.mlflow_tracking_uri,
        settings.model_name,
    )
    if watched.get("rolled_back_to"):
        return Completed(
            name="RolledBack",
            message=f"v{version} rolled back to v{watched['rolled_back_to']}: {watched['reason']}",
        )
    return Completed(message=f"v{version}: {watched.get('reason')}")


def watch_spec(settings: Settings) -> WatchSpec:
    return WatchSpec(
        window_s=settings.watch_window_s,
        poll_s=settings.watch_poll_s,
        max_error_rate=settings.watch_max_error_rate,
        max_p99_ratio=settings.watch_max_p99_ratio,
        min_requests=settings.watch_min_requests,
    )
