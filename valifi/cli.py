"""The `valifi` command. Heavy libraries are imported inside the commands that need them."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from core.settings import Settings


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from valifi import stack

    if args.action == "up":
        for s in stack.up(settings, with_apps=args.apps):
            print(s.line())
        print(f"data, logs and pids under {settings.data_dir}")
    elif args.action == "status":
        states = stack.status(settings)
        for s in states:
            print(s.line())
        return 0 if all(s.state in ("running", "embedded", "external") for s in states) else 3
    else:
        stopped = stack.down(settings, only_apps=args.apps)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _seed_data(args: argparse.Namespace, settings: Settings) -> int:
    from model.synthetic import BadRows, World
    from valifi import stack
    from valifi.seed import seed

    drift = datetime.fromisoformat(args.drift_at) if args.drift_at else None
    end = datetime.fromisoformat(args.end) if args.end else None
    bad = BadRows(args.bad_null, args.bad_range, args.bad_malformed)
    mode = (
        "replace"
        if args.replace
        else "append"
        if args.append
        else "if-empty"
        if args.if_empty
        else "refuse"
    )
    result = seed(
        stack.database_url(settings),
        args.rows,
        days=args.days,
        layout=args.layout,
        world=World(seed=args.seed, drift_at=drift, hard=args.world == "hard"),
        bad=bad,
        mode=mode,
        table=settings.export.table,
        bots_table=settings.export.bots_table,
        end=end,
    )
    if result.rows == 0:
        print(f"{settings.export.table} already holds data; left as it is")
        return 0
    print(
        f"inserted {result.rows} rows into {settings.export.table} (layout {result.layout}); "
        f"bots: {', '.join(result.bots)}"
    )
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from flows.export import InsufficientData, Manifest, export_snapshot
    from valifi import stack

    given = {"days": args.days, "limit": args.limit, "min_rows": args.min_rows}
    spec = settings.export.model_copy(update={k: v for k, v in given.items() if v is not None})
    try:
        snap = export_snapshot(
            stack.database_url(settings), spec, args.out or settings.snapshots_dir
        )
    except InsufficientData as exc:
        print(f"valifi export: {exc}", file=sys.stderr)
        return 2
    print(Manifest.read(snap).to_json())
    print(f"snapshot: {snap}")
    return 0


def _validate(args: argparse.Namespace, settings: Settings) -> int:
    from flows.validate import accept, validate_snapshot

    if args.accept:
        from core.registry import whoami

        record = accept(args.snapshot, args.reason or "", whoami())
        print(
            f"accepted by {record['by']} at {record['at']}: {record['reason']}\n"
            + "\n".join(f"- {line}" for line in record["accepted"])
            + f"\nthe next run compares the shares with {args.snapshot}"
        )
        return 0
    min_rows = settings.export.min_rows if args.min_rows is None else args.min_rows
    result = validate_snapshot(args.snapshot, settings.validation, min_rows)
    if result.success:
        print(f"validation passed: {result.evaluated} expectations; {result.compared()}")
    else:
        print(result.reason(), file=sys.stderr)
    print(f"data docs: {result.docs}")
    return 0 if result.success else 1


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from valifi import stack

    # The flow reads the database from settings; the embedded one is started here.
    os.environ["DATABASE_URL"] = stack.database_url(settings)
    from flows.pipeline import train

    extra = [a for a in (args.train_args or []) if a != "--"]
    state = train(
        days=args.days,
        limit=args.limit,
        min_rows=args.min_rows,
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_epochs=args.max_epochs,
        train_args=extra,
        return_state=True,
    )
    print(f"{state.name}: {state.message}")
    return 0 if state.is_completed() else 1


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    record = _registry(settings).promote(args.version, args.reason, **_expect(args))
    print(f"Production: v{record['from']} -> v{record['to']} ({record['why']}, by {record['by']})")
    return 0


def _registry(settings: Settings):
    from core.registry import Registry

    return Registry(settings.mlflow_tracking_uri, settings.model_name)


def _expect(args: argparse.Namespace) -> dict:
    """`--expect V` (or `none`): the version Production must hold for the move to happen."""
    if args.expect is None:
        return {}
    return {"expected": None if args.expect.lower() == "none" else args.expect}


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    record = _registry(settings).rollback(args.reason, args.to, **_expect(args))
    print(
        f"Production rolled back: v{record['from']} -> v{record['to']} ({record['why']}, "
        f"by {record['by']})"
    )
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import shutil
    import time

    port = args.port or settings.local_port(settings.python_agent_url) or 8000
    if args.workers:  # the worker processes read settings from the environment
        os.environ["VALIFI_SERVE_WORKERS"] = str(args.workers)
        settings.serve.workers = args.workers
    # Every process of the server writes its metrics and status here; /metrics and
    # /status add them up.
    from serving.status import STATUS_DIR_ENV

    for kind, var in (("metrics", "PROMETHEUS_MULTIPROC_DIR"), ("status", STATUS_DIR_ENV)):
        folder = settings.data_dir / f"serving-{kind}" / str(port)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ[var] = str(folder)
    os.environ["VALIFI_SERVER_STARTED_AT"] = str(time.time())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from valifi.supervise import supervise

    host = args.host or settings.serve.host
    cmd = [sys.executable, "-m", "serving", host, str(port)]
    return supervise(cmd, dict(os.environ), Path(os.environ[STATUS_DIR_ENV]))


def _health(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    url = (args.url or settings.python_agent_url).rstrip("/")
    headers = {"X-API-Key": settings.serve.api_key} if settings.serve.api_key else {}
    try:
        r = httpx.post(
            f"{url}/predict",
            json={"task": "What is the system status?", "query_type": "info"},
            headers=headers,
            timeout=args.timeout,
        )
    except httpx.HTTPError as exc:
        print(f"unhealthy: {url} did not answer: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"unhealthy: HTTP {r.status_code}: {r.text[:300]}", file=sys.stderr)
        return 1
    body = r.json()
    print(body.get("answer", ""))
    status = body.get("data", {})
    if args.require_model and not status.get("version"):
        print("unhealthy: no model is serving", file=sys.stderr)
        return 1
    try:
        workers = httpx.get(f"{url}/status", headers=headers, timeout=args.timeout).json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"unhealthy: {url}/status did not answer: {exc}", file=sys.stderr)
        return 1
    if workers.get("state") != "ok":
        print("unhealthy: degraded: " + "; ".join(workers.get("problems", [])), file=sys.stderr)
        return 1
    return 0


def _deploy(args: argparse.Namespace, settings: Settings) -> int:
    from valifi.deploy import deploy

    for line in deploy(settings):
        print(line)
    print("run it now with: prefect deployment run train/nightly")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from valifi import stack
    from valifi.deploy import ROOT, worker_command

    cmd, env = worker_command(settings)
    env["DATABASE_URL"] = stack.database_url(settings)  # the flows it runs read this
    os.chdir(ROOT)
    os.execvpe(cmd[0], cmd, env)  # the worker replaces this process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valifi", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stack", help="start, inspect or stop the local services")
    s.add_argument("action", choices=["up", "status", "down"])
    s.add_argument(
        "--apps",
        action="store_true",
        help="with up: also start the Prefect worker and the agent server",
    )
    s.set_defaults(func=_stack)

    s = sub.add_parser("seed-data", help="fill bot_training_data with synthetic interactions")
    s.add_argument("--rows", type=int, default=10_000)
    s.add_argument("--days", type=float, default=7.0)
    s.add_argument("--layout", choices=["app", "design"], default="app")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--end", help="timestamp of the newest row (ISO, UTC; default now)")
    s.add_argument("--drift-at", help="rewards follow the shifted regime from this time (ISO)")
    s.add_argument(
        "--world",
        choices=["default", "hard"],
        default="default",
        help="hard: more and parameterised actions, noisier rewards, a rarely explored best action",
    )
    s.add_argument("--bad-null", type=float, default=0.0, help="fraction with NULL reward")
    s.add_argument("--bad-range", type=float, default=0.0, help="fraction out of range")
    s.add_argument("--bad-malformed", type=float, default=0.0, help="fraction malformed")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--append", action="store_true", help="add to an existing table")
    g.add_argument("--replace", action="store_true", help="drop and recreate the table")
    g.add_argument(
        "--if-empty",
        action="store_true",
        help="seed only when the table is missing or empty; else leave it",
    )
    s.set_defaults(func=_seed_data)

    s = sub.add_parser("export", help="export bot_training_data into a Parquet snapshot")
    s.add_argument("--out", type=Path, help="folder to create the snapshot in")
    s.add_argument("--days", type=float, help="window in days (default: settings, 7)")
    s.add_argument("--limit", type=int, help="newest rows at most (default: settings, 10000)")
    s.add_argument("--min-rows", type=int, help="fewer rows than this is an error (100)")
    s.set_defaults(func=_export)

    s = sub.add_parser("validate", help="validate a snapshot with the expectation suite")
    s.add_argument("snapshot", type=Path)
    s.add_argument("--min-rows", type=int, help="minimum rows expected (default: settings)")
    s.add_argument(
        "--accept",
        action="store_true",
        help="accept the change in shares that failed this snapshot as real (needs "
        "--reason); the next run compares with it",
    )
    s.add_argument("--reason", help="with --accept: why the new mix is real")
    s.set_defaults(func=_validate)

    s = sub.add_parser("train", help="run the train flow once against the configured services")
    s.add_argument("--days", type=float)
    s.add_argument("--limit", type=int)
    s.add_argument("--min-rows", type=int)
    s.add_argument("--devices", type=int, help="training processes per node")
    s.add_argument("--num-nodes", type=int)
    s.add_argument("--max-epochs", type=int)
    s.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: arguments for python -m model.train"
    )
    s.set_defaults(func=_train)

    s = sub.add_parser("promote", help="move Production to a version (after a load check)")
    s.add_argument("version")
    s.add_argument("--reason", required=True)
    s.add_argument("--expect", help="move only if Production holds this version (or 'none')")
    s.set_defaults(func=_promote)

    s = sub.add_parser("rollback", help="move Production back (to the previous one by default)")
    s.add_argument(
        "--to",
        help="version to roll back to (default: the last one before the current that was "
        "not itself rolled back from)",
    )
    s.add_argument("--reason", required=True)
    s.add_argument("--expect", help="move only if Production holds this version")
    s.set_defaults(func=_rollback)

    s = sub.add_parser("serve", help="run the agent server (POST /predict)")
    s.add_argument("--host", help="default: VALIFI_SERVE_HOST (127.0.0.1)")
    s.add_argument("--port", type=int, help="default: the port of PYTHON_AGENT_URL (8000)")
    s.add_argument("--workers", type=int, help="inference workers (default: settings, 2)")
    s.set_defaults(func=_serve)

    s = sub.add_parser("health", help="ask a running server for its status; exit 1 if unhealthy")
    s.add_argument("--url", help="default: PYTHON_AGENT_URL")
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument(
        "--require-model", action="store_true", help="also unhealthy when no model is serving"
    )
    s.set_defaults(func=_health)

    s = sub.add_parser("deploy", help="create or update the work pool and train/nightly")
    s.set_defaults(func=_deploy)

    s = sub.add_parser("worker", help="run a Prefect worker for the valifi-process pool")
    s.set_defaults(func=_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    # The libraries and every process started from here read these from the environment;
    # settings (with their defaults and .env) are the one source of truth.
    os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    try:
        return args.func(args, settings)
    except Exception as exc:  # every command ends with a readable reason, not a traceback
        if getattr(args, "debug", False):
            raise
        print(f"valifi {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
