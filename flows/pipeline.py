"""The `train` flow: export → validate → train → evaluate → register → promote → watch.

The flow only calls tasks, and tasks only call the modules that do the work
(`flows.export`, `flows.validate`, `flows.training`, `flows.gate`, `flows.watch`,
`core.registry`). Tasks that touch the network or the database retry with backoff
(delays from settings), and only on an I/O error (the database, the registry or the
network failed: `retry_on_io`); an error in our own code or data fails at once with
its traceback. Every run ends
in a clear state: Completed (promoted vN), Rejected (by the gate, or because
`Production` moved while it ran), Skipped (too little data, or superseded),
RolledBack, or Failed with the reason.

One run at a time, however it was started (the deployment or `valifi train`): the
whole run holds the Prefect global concurrency limit `valifi-train`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Completed

from core.registry import AliasMoved, Registry, git_commit
from core.settings import (
    CHALLENGER,
    ExportSpec,
    GateSpec,
    Settings,
    TrainSpec,
    ValidationSpec,
    WatchSpec,
)
from flows.export import InsufficientData, export_snapshot
from flows.gate import judge_against_production
from flows.shadow import settle
from flows.source import SourceError
from flows.summary import render
from flows.training import launch, train_options
from flows.validate import ValidationFailed, accept, accept_hint, validate_snapshot
from flows.watch import watch_and_rollback
from model.result import TrainResult
from model.snapshot import Manifest

LOCK = "valifi-train"  # the global concurrency limit every train run holds

# MLflow error codes of a registry that is down, overloaded or unreachable (its
# client reports a refused connection or a timeout as INTERNAL_ERROR)
TRANSIENT_MLFLOW = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def is_io_error(exc: BaseException | None) -> bool:
    """Whether another try may succeed: the database, the registry or the network
    failed (directly or as the cause of the error raised)."""
    import adbc_driver_manager
    import httpx
    import psycopg
    import requests
    from mlflow.exceptions import MlflowException

    io = (
        ExportError,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        requests.RequestException,
        httpx.TransportError,
        psycopg.OperationalError,
        psycopg.InterfaceError,
        adbc_driver_manager.OperationalError,
    )
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, io):
            return True
        if isinstance(exc, MlflowException):
            return exc.error_code in TRANSIENT_MLFLOW
        exc = exc.__cause__
    return False


def io_retries(settings: Settings) -> dict:
    """Task options of the I/O tasks: a retry after each of the settings' delays."""
    delays = settings.retry_delays_s
    return {"retries": len(delays), "retry_delay_seconds": delays}


def retry_on_io(task, task_run, state) -> bool:
    """Prefect's retry condition for the I/O tasks: retry I/O errors only."""
    try:
        state.result()
    except Exception as exc:
        return is_io_error(exc)
    return False


class ExportError(RuntimeError):
    """The database could not be reached or read; the message says why."""


class RunLockTimeout(RuntimeError):
    """Another train run held the lock for longer than this run would wait."""


@task(name="export", retry_condition_fn=retry_on_io)
def export_task(url: str, spec: ExportSpec, out_root: Path) -> str:
    """Snapshot the table; InsufficientData (not retried) when there are too few rows."""
    import adbc_driver_manager
    import psycopg

    try:
        snap = export_snapshot(url, spec, out_root)
    except InsufficientData as exc:
        get_run_logger().warning("%s", exc)
        raise
    except (
        psycopg.OperationalError,
        psycopg.InterfaceError,
        adbc_driver_manager.OperationalError,
    ) as exc:
        raise ExportError(f"export from table {spec.table!r} failed: {exc}".strip()) from exc
    except (psycopg.Error, adbc_driver_manager.Error) as exc:  # the query itself: no retry
        raise SourceError(f"export from table {spec.table!r} failed: {exc}".strip()) from exc
    m = Manifest.read(snap)
    log = get_run_logger()
    log.info(
        "snapshot %s: %d rows (%d unscored), %s .. %s, sha256 %s",
        snap.name,
        m.rows,
        m.null_reward_rows,
        m.oldest,
        m.watermark,
        m.sha256[:12],
    )
    if m.limit_cut:
        log.warning(
            "the window held %d rows; only the newest %d were exported (VALIFI_EXPORT_LIMIT)",
            m.window_rows,
            m.limit,
        )
    return str(snap)


@task(name="validate")
def validate_task(snapshot: str, spec: ValidationSpec, min_rows: int) -> str:
    result = validate_snapshot(Path(snapshot), spec, min_rows)
    if not result.success:
        raise ValidationFailed(result)
    get_run_logger().info(
        "validation passed: %d expectations; %s; docs %s",
        result.evaluated,
        result.compared(),
        result.docs,
    )
    return f"passed ({result.evaluated} checks; {result.compared()}); Data Docs: `{result.docs}`"


def validate_or_ask(snapshot: str, spec: ValidationSpec, min_rows: int) -> str:
    """The validation task; when it fails on the shares alone and `approval_wait_s` is
    set, the run waits for the new mix to be accepted in the Prefect UI."""
    try:
        return validate_task(snapshot, spec, min_rows)
    except ValidationFailed as exc:
        if not (exc.result.acceptable and spec.approval_wait_s > 0):
            raise
        return ask_to_accept(exc, spec.approval_wait_s)


class AcceptNewMix(RunInput):
    """The Prefect UI's form when a run waits for the new mix of bots to be accepted."""

    accept: bool = False
    reason: str = ""
    by: str = ""


def ask_to_accept(failed: ValidationFailed, wait_s: float) -> str:
    """Pause the run until someone accepts the new mix in the Prefect UI (with a reason)
    or `wait_s` passes; an acceptance is recorded as `valifi validate --accept` records
    it. Raises the validation failure when nobody accepts in time."""
    result = failed.result
    log = get_run_logger()
    log.warning(
        "validation failed on the shares alone; this run waits %g s for the new mix to "
        "be accepted (Prefect UI: resume the run, tick accept, give a reason), or: %s",
        wait_s,
        accept_hint(result.snapshot),
    )
    wait = max(1, round(wait_s))
    try:
        answer = pause_flow_run(
            wait_for_input=AcceptNewMix, timeout=wait, poll_interval=max(1, min(10, wait // 4))
        )
    except FlowPauseTimeout:
        _resume_to_fail()
        raise ValidationFailed(result, f"Nobody accepted the new mix within {wait} s.") from None
    if not (answer.accept and answer.reason.strip()):
        raise ValidationFailed(result, "The new mix was not accepted (accept and a reason).")
    by = answer.by.strip() or f"Prefect UI ({_flow_run_name()})"
    record = accept(Path(result.snapshot), answer.reason, by)
    log.info("new mix accepted by %s: %s", record["by"], record["reason"])
    return (
        f"failed on the shares alone; the new mix was accepted by {record['by']} at "
        f"{record['at']}: {record['reason']}; Data Docs: `{result.docs}`"
    )


@task(name="train")
def train_task(snapshot: str, out: Path, spec: TrainSpec, extra: list[str]) -> TrainResult:
    get_run_logger().info("training %s with %s", snapshot, " ".join(train_options(spec, extra)))
    result = launch(Path(snapshot), out, spec, extra)
    get_run_logger().info("trained: %s", {k: result.metrics.get(k) for k in ("rmse", "auc")})
    return result


@task(name="evaluate", retry_condition_fn=retry_on_io)
def evaluate_task(
    registry: Registry, result: TrainResult, snapshot: str, spec: GateSpec, cache: Path
) -> dict:
    decision = judge_against_production(registry, result, Path(snapshot), spec, cache)
    get_run_logger().info("gate: %s", decision.summary())
    return decision.to_dict()


@task(name="register", retry_condition_fn=retry_on_io)
def register_task(
    registry: Registry, result: TrainResult, snapshot: str, gate: dict, run_key: str
) -> dict:
    m = Manifest.read(Path(snapshot))
    lineage = {
        "snapshot_sha256": m.sha256,
        "snapshot_rows": m.rows,
        "window_since": m.window["since"],
        "window_until": m.window["until"],
        "watermark": m.watermark,
        "source_layout": m.layout,
        "git_commit": git_commit(),
        "config": json.dumps({k: result.config[k] for k in ("model", "train", "trainer")}),
        "gate_decision": "pass" if gate["passed"] else "reject",
        "gate_reasons": "; ".join(gate["reasons"]),
        "flow_run": _flow_run_name(),
    }
    v = registry.register(result, Path(snapshot), gate, lineage, run_key)
    get_run_logger().info("registered %s v%s", registry.name, v.version)
    return {
        "name": registry.name,
        "version": v.version,
        "run_id": v.run_id,
        "version_url": registry.version_url(v.version),
        "run_url": registry.run_url(v.run_id) if v.run_id else None,
    }


@task(name="load-check")
def load_check_task(registry: Registry, version: str) -> str:
    return registry.load_check(version)


@task(name="promote", retry_condition_fn=retry_on_io)
def promote_task(
    registry: Registry, version: str, expected: str | None, reason: str, move_id: str
) -> dict:
    """Move Production to `version` only if it still holds `expected` (what the gate
    judged against); a retry completes the same move and audit record."""
    return registry.move(
        version, expected, reason, f"prefect:{_flow_run_name()}", "promote", move_id
    )


@task(name="shadow", retry_condition_fn=retry_on_io)
def shadow_task(url: str, registry: Registry, spec: GateSpec, move_id: str) -> dict | None:
    """Settle the Challenger on its live evidence (flows.shadow.settle)."""
    settled = settle(url, registry, spec, f"prefect:{_flow_run_name()}", move_id)
    if settled:
        get_run_logger().info(
            "shadow: Challenger v%s: %s: %s",
            settled["version"],
            settled["verdict"],
            settled["reason"],
        )
    return settled


@task(name="challenger", retry_condition_fn=retry_on_io)
def challenger_task(registry: Registry, version: str, reason: str, move_id: str) -> dict:
    """Put `version` on the Challenger alias (scored in shadow), over whatever it holds."""
    current = registry.challenger()
    return registry.move(
        version,
        current.version if current else None,
        reason,
        f"prefect:{_flow_run_name()}",
        "shadow",
        move_id,
        CHALLENGER,
    )


@task(name="watch", retries=0)
def watch_task(
    registry: Registry, agent_url: str, version: str, previous: str | None, spec: WatchSpec
) -> dict:
    """Watch the new version on the server; move Production back if the rollout fails or
    it breaches, while Production still holds it."""
    return watch_and_rollback(
        registry,
        agent_url,
        version,
        previous,
        spec,
        by=f"prefect:{_flow_run_name()}",
        move_id=f"{_flow_run_id()}:rollback:{version}",
        log=get_run_logger().info,
    )


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


def override_hint(rejected: list[str], gate: dict, version: str) -> str:
    """How many runs in a row the gate rejected, and the audited way to promote anyway."""
    champion = f"v{gate['champion_version']}" if gate.get("champion_version") else "Production"
    n = len(rejected)
    lead = (
        f"The gate has rejected {n} runs in a row against {champion} (v{', v'.join(rejected)})"
        if n > 1
        else f"The first rejection against {champion}"
    )
    return (
        f"{lead}. To promote v{version} anyway (load-checked, audited): "
        f'valifi promote {version} --reason "<why>"'
    )


def _resume_to_fail() -> None:
    """Move this timed-out paused run back to Running, so that it fails with its own
    reason (the server would replace the reason of a paused run's failure with its own)."""
    from prefect import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Running(), force=True)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"train/{flow_run.name}" if flow_run.name else "train"


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4())


def run_lock(wait_s: float):
    """The one-at-a-time guard: a slot of the global concurrency limit `valifi-train`."""
    from prefect import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(LOCK, 1)
    return concurrency(LOCK, occupy=1, timeout_seconds=wait_s, strict=True)


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


@dataclass
class Run:
    """What one run of `train` works with: its settings (the flow's parameters applied),
    the extra training options, and the summary it fills as it goes."""

    settings: Settings
    export: ExportSpec
    train: TrainSpec
    extra: list[str]
    summary: dict = field(default_factory=dict)

    @property
    def retrying(self) -> dict:
        return io_retries(self.settings)


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

    def given(**values) -> dict:
        return {k: v for k, v in values.items() if v is not None}

    run = Run(
        settings,
        settings.export.model_copy(update=given(days=days, limit=limit, min_rows=min_rows)),
        settings.train.model_copy(
            update=given(devices=devices, num_nodes=num_nodes, max_epochs=max_epochs)
        ),
        list(train_args or []),
    )
    try:
        with _held_lock(settings.train.lock_wait_s):
            state = _train(run)
        run.summary["decision"] = f"{state.name}: {state.message}"
        return state
    except BaseException as exc:
        run.summary["decision"] = "Failed"
        run.summary["error"] = str(exc)[:3000]
        raise
    finally:
        _publish(run.summary)


@contextlib.contextmanager
def _held_lock(wait_s: float):
    """The one-at-a-time lock for the length of the run, or RunLockTimeout."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(run_lock(wait_s))
        except TimeoutError:
            raise RunLockTimeout(
                f"another train run held the lock {LOCK!r} for more than {wait_s:g} s; "
                "this run did nothing"
            ) from None
        yield


def _train(run: Run):
    """The stages, in order; each returns the run's final state when it ends the run."""
    settings = run.settings
    if not settings.database_url:
        raise ValueError(
            "DATABASE_URL is not set: point it at the database holding "
            f"{run.export.table} (`valifi train` and `valifi worker` set it for the embedded one)"
        )
    if newer := superseded_task(settings.late_run_grace_s):
        return _skipped(f"superseded by the newer scheduled run {newer}")
    registry = Registry(settings.mlflow_tracking_uri, settings.model_name)
    settled = shadow_task.with_options(**run.retrying)(
        settings.database_url, registry, settings.gate, f"{_flow_run_id()}:shadow"
    )
    if settled:
        run.summary["shadow"] = settled["text"]
    try:
        snapshot = export_task.with_options(**run.retrying)(
            settings.database_url, run.export, settings.snapshots_dir
        )
    except InsufficientData as exc:
        return _skipped(str(exc))
    run.summary["snapshot"] = asdict(Manifest.read(Path(snapshot)))
    run.summary["validation"] = "failed (see the error)"
    run.summary["validation"] = validate_or_ask(snapshot, settings.validation, run.export.min_rows)
    out = settings.runs_dir / f"{Path(snapshot).name}-{uuid.uuid4().hex[:8]}"
    result = train_task(snapshot, out, run.train, run.extra)
    run.summary["training"] = {"metrics": result.metrics, "config": result.config}
    cache = settings.data_dir / "registry-cache" / settings.model_name
    gate = evaluate_task.with_options(**run.retrying)(
        registry, result, snapshot, settings.gate, cache
    )
    run.summary["gate"] = gate
    reg = register_task.with_options(**run.retrying)(
        registry, result, snapshot, gate, f"{_flow_run_id()}:{out.name}"
    )
    run.summary["registry"] = reg
    if not gate["passed"]:
        return _rejected(run, registry, gate, reg["version"])
    return _promote(run, registry, gate, reg["version"])


def _skipped(why: str):
    """A run that had nothing to do ends completed, named Skipped, with the reason."""
    return Completed(name="Skipped", message=f"skipped: {why}")


def _rejected(run: Run, registry: Registry, gate: dict, version: str):
    run.summary["override"] = override_hint(registry.rejected_in_a_row(), gate, version)
    return Completed(
        name="Rejected",
        message=f"rejected by the gate (v{version} registered, not promoted): "
        + "; ".join(gate["reasons"])
        + f". {run.summary['override']}",
    )


def _promote(run: Run, registry: Registry, gate: dict, version: str):
    """Load-check, move Production (if it still holds what the gate judged), watch; or
    with `promote_via` shadow, put it on the Challenger alias instead."""
    load_check_task(registry, version)
    # (a first model goes to Production all the same: the shadow needs one serving)
    if run.settings.gate.promote_via == "shadow" and gate.get("champion_version"):
        challenger_task.with_options(**run.retrying)(
            registry, version, gate["summary"], f"{_flow_run_id()}:shadow:{version}"
        )
        return Completed(
            name="Challenger",
            message=f"v{version} passed the gate and is scored in shadow as {CHALLENGER} "
            f"(Production stays v{gate['champion_version']}); a later run, or `valifi promote "
            "--from-shadow`, promotes it once its live value is shown non-inferior: "
            + "; ".join(gate["reasons"]),
        )
    try:
        move = promote_task.with_options(**run.retrying)(
            registry,
            version,
            gate["champion_version"],
            gate["summary"],
            f"{_flow_run_id()}:promote:{version}",
        )
    except AliasMoved as exc:
        return Completed(name="Rejected", message=f"v{version} registered, not promoted: {exc}")
    promoted = f"promoted v{version}: " + "; ".join(gate["reasons"])
    watch = run.settings.watch
    if watch.window_s <= 0:
        return Completed(message=promoted)
    watched = watch_task(registry, run.settings.python_agent_url, version, move["from"], watch)
    back = watched["rolled_back_to"]
    run.summary["watch"] = (
        f"rolled back to v{back}: {watched['reason']}" if back else f"watched: {watched['reason']}"
    )
    if back:
        return Completed(
            name="RolledBack",
            message=f"v{version} promoted, then rolled back to v{back}: {watched['reason']}",
        )
    return Completed(message=promoted)
