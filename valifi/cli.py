"""The `valifi` command: typed functions made into commands by typer. Heavy libraries are
imported inside the commands that need them; the help texts show the settings' own
defaults (core/settings.py), read from their declarations."""

from __future__ import annotations

import functools
import os
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from core.settings import ExportSpec, Settings, WatchSpec

app = typer.Typer(
    help="Turns the bots' logged decisions into a model retrained nightly, gated, "
    "registered and hot-swapped into the agent server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_debug = {"on": False}


def _default(section: type, name: str) -> str:
    """A setting's declared default, for a help text."""
    value = section.model_fields[name].default
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _settings() -> Settings:
    """The settings of this invocation; the libraries and every process started from here
    read the services from the environment, so settings are their one source."""
    settings = Settings()
    os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    return settings


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="show tracebacks")] = False) -> None:
    _debug["on"] = debug


def command(name: str | None = None, group: typer.Typer | None = None, **kw):
    """`app.command` (or `group.command`, for a subcommand), for a function that returns
    its exit status: an exception ends the command with its message instead of a
    traceback (`--debug` shows it)."""

    def register(fn):
        shown = name or fn.__name__
        said = f"{group.info.name} {shown}" if group is not None else shown

        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                code = fn(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:
                if _debug["on"]:
                    raise
                print(f"valifi {said}: error: {exc}", file=sys.stderr)
                raise typer.Exit(1) from None
            if code:
                raise typer.Exit(code)

        return (group or app).command(shown, **kw)(run)

    return register


def _registry(settings: Settings):
    from core.registry import Registry

    return Registry(settings.mlflow_tracking_uri, settings.model_name)


# --- the local stack -------------------------------------------------------------------


class StackAction(StrEnum):
    up = "up"
    status = "status"
    down = "down"


@command()
def stack(
    action: StackAction,
    apps: Annotated[
        bool, typer.Option(help="with up: also start the Prefect worker and the agent server")
    ] = False,
) -> int:
    """Start, inspect or stop the local services."""
    from valifi import stack as local

    settings = _settings()
    if action is StackAction.up:
        for s in local.up(settings, with_apps=apps):
            print(s.line())
        print(f"data, logs and pids under {settings.data_dir}")
    elif action is StackAction.status:
        states = local.status(settings)
        for s in states:
            print(s.line())
        return 0 if all(s.state in ("running", "embedded", "external") for s in states) else 3
    else:
        stopped = local.down(settings, only_apps=apps)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


# --- data ----------------------------------------------------------------------------


class Layout(StrEnum):
    app = "app"
    design = "design"


class WorldKind(StrEnum):
    default = "default"
    hard = "hard"


@command("seed-data")
def seed_data(
    rows: int = 10_000,
    days: float = 7.0,
    layout: Layout = Layout.app,
    seed: int = 0,
    end: Annotated[str | None, typer.Option(help="time of the newest row (ISO, UTC)")] = None,
    drift_at: Annotated[
        str | None, typer.Option(help="rewards follow the shifted regime from this time (ISO)")
    ] = None,
    world: Annotated[
        WorldKind,
        typer.Option(
            help="hard: more and parameterised actions, noisier rewards, a rarely explored "
            "best action"
        ),
    ] = WorldKind.default,
    bad_null: Annotated[float, typer.Option(help="fraction with NULL reward")] = 0.0,
    bad_range: Annotated[float, typer.Option(help="fraction out of range")] = 0.0,
    bad_malformed: Annotated[float, typer.Option(help="fraction malformed")] = 0.0,
    append: Annotated[bool, typer.Option(help="add to an existing table")] = False,
    replace: Annotated[bool, typer.Option(help="drop and recreate the table")] = False,
    if_empty: Annotated[
        bool, typer.Option(help="seed only when the table is missing or empty; else leave it")
    ] = False,
) -> int:
    """Fill bot_training_data with synthetic interactions."""
    from model.synthetic import BadRows, World
    from valifi import stack as local
    from valifi.seed import seed as fill

    if append + replace + if_empty > 1:
        raise typer.BadParameter("--append, --replace and --if-empty exclude each other")
    settings = _settings()
    mode = "replace" if replace else "append" if append else "if-empty" if if_empty else "refuse"
    result = fill(
        local.database_url(settings),
        rows,
        days=days,
        layout=layout.value,
        world=World(
            seed=seed,
            drift_at=datetime.fromisoformat(drift_at) if drift_at else None,
            hard=world is WorldKind.hard,
        ),
        bad=BadRows(bad_null, bad_range, bad_malformed),
        mode=mode,
        table=settings.export.table,
        bots_table=settings.export.bots_table,
        end=datetime.fromisoformat(end) if end else None,
    )
    if result.rows == 0:
        print(f"{settings.export.table} already holds data; left as it is")
        return 0
    print(
        f"inserted {result.rows} rows into {settings.export.table} (layout {result.layout}); "
        f"bots: {', '.join(result.bots)}"
    )
    return 0


def _window_options(**given) -> dict:
    return {k: v for k, v in given.items() if v is not None}


DaysOption = Annotated[
    float | None,
    typer.Option(help=f"window in days (VALIFI_EXPORT_DAYS, {_default(ExportSpec, 'days')})"),
]
LimitOption = Annotated[
    int | None,
    typer.Option(
        help=f"newest rows at most (VALIFI_EXPORT_LIMIT, {_default(ExportSpec, 'limit')})"
    ),
]
MinRowsOption = Annotated[
    int | None,
    typer.Option(
        help=f"fewer trainable rows than this is too few (VALIFI_EXPORT_MIN_ROWS, "
        f"{_default(ExportSpec, 'min_rows')})"
    ),
]


@command()
def export(
    out: Annotated[Path | None, typer.Option(help="folder to create the snapshot in")] = None,
    days: DaysOption = None,
    limit: LimitOption = None,
    min_rows: MinRowsOption = None,
) -> int:
    """Export bot_training_data into a Parquet snapshot."""
    from flows.export import InsufficientData, export_snapshot
    from model.snapshot import Manifest
    from valifi import stack as local

    settings = _settings()
    spec = settings.export.model_copy(
        update=_window_options(days=days, limit=limit, min_rows=min_rows)
    )
    try:
        snap = export_snapshot(local.database_url(settings), spec, out or settings.snapshots_dir)
    except InsufficientData as exc:
        print(f"valifi export: {exc}", file=sys.stderr)
        return 2
    print(Manifest.read(snap).to_json())
    print(f"snapshot: {snap}")
    return 0


@command()
def validate(
    snapshot: Path,
    min_rows: MinRowsOption = None,
    accept: Annotated[
        bool,
        typer.Option(
            help="accept the change in shares that failed this snapshot as real (needs "
            "--reason); the next run compares with it"
        ),
    ] = False,
    reason: Annotated[str | None, typer.Option(help="with --accept: why the mix is real")] = None,
) -> int:
    """Validate a snapshot with the expectation suite (or accept its new mix)."""
    from flows.validate import accept as accept_mix
    from flows.validate import validate_snapshot

    settings = _settings()
    if accept:
        from core.registry import whoami

        record = accept_mix(snapshot, reason or "", whoami())
        print(
            f"accepted by {record['by']} at {record['at']}: {record['reason']}\n"
            + "\n".join(f"- {line}" for line in record["accepted"])
            + f"\nthe next run compares the shares with {snapshot}"
        )
        return 0
    floor = settings.export.min_rows if min_rows is None else min_rows
    result = validate_snapshot(snapshot, settings.validation, floor)
    if result.success:
        print(f"validation passed: {result.evaluated} expectations; {result.compared()}")
    else:
        print(result.reason(), file=sys.stderr)
    print(f"data docs: {result.docs}")
    return 0 if result.success else 1


# --- training and the registry ------------------------------------------------------


@command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    days: DaysOption = None,
    limit: LimitOption = None,
    min_rows: MinRowsOption = None,
    devices: Annotated[int | None, typer.Option(help="training processes per node")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="nodes training one model")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="epochs (default: the model's)")] = None,
) -> int:
    """Run the train flow once against the configured services; options after `--` go to
    `python -m model.train` (e.g. `-- --preset large`)."""
    from valifi import stack as local

    settings = _settings()
    # The flow reads the database from settings; the embedded one is started here.
    os.environ["DATABASE_URL"] = local.database_url(settings)
    from flows.pipeline import train as train_flow

    state = train_flow(
        days=days,
        limit=limit,
        min_rows=min_rows,
        devices=devices,
        num_nodes=num_nodes,
        max_epochs=max_epochs,
        train_args=[a for a in ctx.args if a != "--"],
        return_state=True,
    )
    print(f"{state.name}: {state.message}")
    return 0 if state.is_completed() else 1


ExpectOption = Annotated[
    str | None,
    typer.Option(help="move only if Production holds this version (or 'none')"),
]
ReasonOption = Annotated[str, typer.Option(help="why; recorded in the audit trail")]


def _expect(expect: str | None) -> dict:
    """`--expect V` (or `none`): the version Production must hold for the move to happen."""
    if expect is None:
        return {}
    return {"expected": None if expect.lower() == "none" else expect}


@command()
def promote(
    version: Annotated[
        str | None, typer.Argument(help="the version (omit with --from-shadow)")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="why; recorded in the audit trail")] = None,
    from_shadow: Annotated[
        bool,
        typer.Option(
            "--from-shadow",
            help="promote the Challenger only if its live value, scored in shadow, is shown "
            "non-inferior to Production's (the gate's margin and effective sample size); "
            "else say why not",
        ),
    ] = False,
    expect: ExpectOption = None,
    watch: Annotated[
        bool,
        typer.Option(
            help="then watch it on the agent server as a nightly run does, and move "
            f"Production back on a breach (VALIFI_WATCH_*, window "
            f"{_default(WatchSpec, 'window_s')} s)"
        ),
    ] = False,
) -> int:
    """Move Production to a version (after a load check), or to the Challenger when its
    shadow evidence shows it non-inferior."""
    settings = _settings()
    registry = _registry(settings)
    if from_shadow:
        if version is not None:
            raise typer.BadParameter("--from-shadow promotes the Challenger: give no version")
        return _promote_from_shadow(settings, registry)
    if version is None or not reason:
        raise typer.BadParameter("give a VERSION and --reason (or --from-shadow)")
    record = registry.promote(version, reason, **_expect(expect))
    print(f"Production: v{record['from']} -> v{record['to']} ({record['why']}, by {record['by']})")
    if not watch:
        return 0
    from core.registry import whoami
    from flows.watch import watch_and_rollback

    watched = watch_and_rollback(
        registry,
        settings.python_agent_url,
        record["to"],
        record["from"],
        settings.watch,
        by=whoami(),
        move_id=f"{record['id']}:rollback",
        log=print,
    )
    if watched["rolled_back_to"]:
        print(f"rolled back to v{watched['rolled_back_to']}: {watched['reason']}")
        return 1
    print(f"watched: {watched['reason']}")
    return 0


def _promote_from_shadow(settings: Settings, registry) -> int:
    from core.registry import whoami
    from flows.shadow import promote_from_shadow, render
    from valifi import stack as local

    verdict, rep, move = promote_from_shadow(
        local.database_url(settings), registry, settings.gate, whoami()
    )
    print(render(rep, verdict))
    if move is None:
        print(f"Production stays v{rep['production']}: {verdict.outcome}", file=sys.stderr)
        return 1
    print(f"Production: v{move['from']} -> v{move['to']}; the Challenger alias is removed")
    return 0


shadow_app = typer.Typer(
    name="shadow",
    help="The Challenger scored in shadow on live traffic: start, stop, report.",
    no_args_is_help=True,
)
app.add_typer(shadow_app)


@command("start", shadow_app)
def shadow_start(version: str, reason: ReasonOption, expect: ExpectOption = None) -> int:
    """Set the Challenger alias to a version (after a load check): the agent server
    scores it in shadow from its next poll."""
    from core.settings import CHALLENGER

    registry = _registry(_settings())
    record = registry.promote(version, reason, action="shadow", alias=CHALLENGER, **_expect(expect))
    print(f"{CHALLENGER}: v{record['from']} -> v{record['to']} ({record['why']})")
    return 0


@command("stop", shadow_app)
def shadow_stop(reason: ReasonOption, expect: ExpectOption = None) -> int:
    """Remove the Challenger alias: the shadow stops."""
    from core.settings import CHALLENGER

    record = _registry(_settings()).clear(CHALLENGER, reason, **_expect(expect))
    print(f"{CHALLENGER} removed (was v{record['from']})" if record else f"no {CHALLENGER} was set")
    return 0


def _when(text: str | None) -> datetime | None:
    """An ISO time from the command line; without a zone, UTC."""
    if text is None:
        return None
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@command("report", shadow_app)
def shadow_report(
    version: Annotated[
        str | None, typer.Option(help="the Challenger version (default: the alias's)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="from (ISO, UTC; default: when the alias was set)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="until (ISO, UTC; default: now)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the figures as JSON")] = False,
) -> int:
    """What the Challenger would have done on the live decisions, and whether it would
    have earned more: counts, agreement, IPS/SNIPS/DR against Production, cost."""
    import json

    from flows.shadow import judge, render, report
    from valifi import stack as local

    settings = _settings()
    rep = report(
        local.database_url(settings),
        _registry(settings),
        settings.gate,
        version,
        _when(since),
        _when(until),
    )
    verdict = judge(rep, settings.gate)
    if as_json:
        print(json.dumps(rep | {"verdict": verdict.__dict__}, indent=2, default=str))
    else:
        print(render(rep, verdict))
    return 0


@command()
def rollback(
    reason: ReasonOption,
    to: Annotated[
        str | None,
        typer.Option(
            help="version to roll back to (default: the last one before the current that "
            "was not itself rolled back from)"
        ),
    ] = None,
    expect: ExpectOption = None,
) -> int:
    """Move Production back (to the previous one by default)."""
    record = _registry(_settings()).rollback(reason, to, **_expect(expect))
    print(
        f"Production rolled back: v{record['from']} -> v{record['to']} ({record['why']}, "
        f"by {record['by']})"
    )
    return 0


# --- serving --------------------------------------------------------------------------


@command()
def serve(
    host: Annotated[str | None, typer.Option(help="default: VALIFI_SERVE_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="default: the port of PYTHON_AGENT_URL")] = None,
    workers: Annotated[
        int | None, typer.Option(help="inference workers (default: VALIFI_SERVE_WORKERS)")
    ] = None,
) -> int:
    """Run the agent server (POST /predict)."""
    import shutil
    import time

    from serving.status import STATUS_DIR_ENV
    from valifi import stack as local
    from valifi.supervise import supervise

    settings = _settings()
    port = port or settings.local_port(settings.python_agent_url) or 8000
    if workers:  # the worker processes read settings from the environment
        os.environ["VALIFI_SERVE_WORKERS"] = str(workers)
    if not settings.database_url and local.embedded_pg_running(settings):
        # the decision log goes where the flows read: the stack's embedded database
        os.environ["DATABASE_URL"] = local.start_embedded_pg(settings)
    # Every process of the server writes its metrics and status here; /metrics and
    # /status add them up.
    for kind, var in (("metrics", "PROMETHEUS_MULTIPROC_DIR"), ("status", STATUS_DIR_ENV)):
        folder = settings.data_dir / f"serving-{kind}" / str(port)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ[var] = str(folder)
    os.environ["VALIFI_SERVER_STARTED_AT"] = str(time.time())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cmd = [sys.executable, "-m", "serving", host or settings.serve.host, str(port)]
    return supervise(cmd, dict(os.environ), Path(os.environ[STATUS_DIR_ENV]))


@command()
def health(
    url: Annotated[str | None, typer.Option(help="default: PYTHON_AGENT_URL")] = None,
    timeout: float = 10.0,
    require_model: Annotated[
        bool, typer.Option(help="also unhealthy when no model is serving")
    ] = False,
) -> int:
    """Ask a running server for its status; exit 1 if unhealthy."""
    import httpx

    settings = _settings()
    url = (url or settings.python_agent_url).rstrip("/")
    headers = {"X-API-Key": settings.serve.api_key} if settings.serve.api_key else {}
    question = {"task": "What is the system status?", "query_type": "info"}
    try:
        r = httpx.post(f"{url}/predict", json=question, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        print(f"unhealthy: {url} did not answer: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"unhealthy: HTTP {r.status_code}: {r.text[:300]}", file=sys.stderr)
        return 1
    body = r.json()
    print(body.get("answer", ""))
    if require_model and not body.get("data", {}).get("version"):
        print("unhealthy: no model is serving", file=sys.stderr)
        return 1
    try:
        workers = httpx.get(f"{url}/status", headers=headers, timeout=timeout).json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"unhealthy: {url}/status did not answer: {exc}", file=sys.stderr)
        return 1
    if workers.get("state") != "ok":
        print("unhealthy: degraded: " + "; ".join(workers.get("problems", [])), file=sys.stderr)
        return 1
    return 0


# --- deployment -------------------------------------------------------------------------


@command()
def deploy() -> int:
    """Create or update the work pool and train/nightly."""
    from valifi.deploy import deploy as apply

    for line in apply(_settings()):
        print(line)
    print("run it now with: prefect deployment run train/nightly")
    return 0


@command()
def worker() -> int:
    """Run a Prefect worker for the valifi-process pool."""
    from valifi import stack as local
    from valifi.deploy import ROOT, worker_command

    settings = _settings()
    cmd, env = worker_command(settings)
    env["DATABASE_URL"] = local.database_url(settings)  # the flows it runs read this
    os.chdir(ROOT)
    os.execvpe(cmd[0], cmd, env)  # the worker replaces this process


def main(argv: list[str] | None = None) -> None:
    """The command line entry point (exits with the command's status)."""
    app(args=argv, prog_name="valifi")


if __name__ == "__main__":
    main()
