"""Export throughput and memory against psql's COPY, side by side in one run.

    python3 scripts/bench.py export_bench [--url URL] [--layout app|design] [--sizes 100000 1000000]

Without --url it starts a throw-away embedded PostgreSQL. For each size it runs,
alternately and `--repeat` times, `psql -c "\\copy (same query) TO STDOUT"` and
our export (each in a fresh process, so the peak RSS is the export's own), and
prints rows/s of both, their ratio, and our peak RSS.
Targets: ratio >= 0.8 at 1M rows; peak RSS at the largest size <= 1.5x that at the smallest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

from flows.source import detect, export_query
from model.synthetic import World
from valifi.seed import seed

ROOT = Path(__file__).resolve().parents[1]

# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a child would report
# this process's own peak (the psql output it held) whenever that was higher.
CHILD = """
import sys, time, json
from pathlib import Path
from flows.export import ExportSpec, export_snapshot
from model.snapshot import Manifest

t = time.perf_counter()
snap = export_snapshot(sys.argv[1], ExportSpec(table=sys.argv[2], days=3650, limit=int(sys.argv[3]),
                       until=None), Path(sys.argv[4]))
dt = time.perf_counter() - t
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": dt, "rows": Manifest.read(snap).rows, "rss_mb": hwm / 1024}))
"""


def psql_binary() -> str:
    found = shutil.which("psql")
    if found:
        return found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    return str(pgserver._commands.POSTGRES_BIN_PATH / "psql")


def grow(url: str, table: str, rows: int) -> None:
    """Seed 100k rows, then copy them with new ids until the table holds `rows`."""
    seed(url, min(rows, 100_000), days=30, world=World(seed=1), table=table, mode="replace")
    with psycopg.connect(url) as conn:
        n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        have = n.fetchone()[0]
        while have < rows:
            take = min(have, rows - have)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {t} (id, bot_id, data_type, input, actual_output, reward, "
                    "created_at) SELECT gen_random_uuid()::text, bot_id, data_type, input, "
                    "actual_output, reward, created_at - interval '1 second' * random() "
                    "FROM {t} LIMIT %s"
                ).format(t=sql.Identifier(table)),
                (take,),
            )
            have += take
        conn.commit()


def psql_copy(url: str, table: str, limit: int) -> float:
    with psycopg.connect(url) as conn, psycopg.ClientCursor(conn) as cur:
        src = detect(cur, table)
        q = export_query(src, conn.info.server_version).as_string(conn)
        params = {
            "since": "1970-01-01 00:00+00",
            "until": "2100-01-01 00:00+00",
            "naive_tz": "UTC",
            "limit": limit,
        }
        query = cur.mogrify(q, params)
    t = time.perf_counter()
    out = subprocess.run(
        [psql_binary(), url, "-q", "-c", f"\\copy ({query}) TO STDOUT WITH (FORMAT csv)"],
        stdout=subprocess.PIPE,
        check=True,
    )
    dt = time.perf_counter() - t
    rows = out.stdout.count(b"\n")
    assert rows >= limit * 0.99, rows
    return dt


def ours(url: str, table: str, limit: int) -> dict:
    import json

    out = Path(tempfile.mkdtemp())
    try:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, url, table, str(limit), str(out)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--table", default="bench_training_data")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    server = None
    if not args.url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        server = pgserver.get_server(Path(tempfile.mkdtemp()) / "pg", cleanup_mode="delete")
        args.url = server.get_uri()
    try:
        with psycopg.connect(args.url) as conn:
            print(f"PostgreSQL {conn.info.server_version}; table {args.table}")
        grow(args.url, args.table, max(args.sizes))
        results = {}
        for n in args.sizes:
            best_psql, best_ours, rss = float("inf"), float("inf"), 0.0
            for _ in range(args.repeat):
                best_psql = min(best_psql, psql_copy(args.url, args.table, n))
                r = ours(args.url, args.table, n)
                best_ours = min(best_ours, r["seconds"])
                rss = max(rss, r["rss_mb"])
            results[n] = rss
            print(
                f"{n:>9,} rows  psql COPY {n / best_psql:>10,.0f} rows/s   ours "
                f"{n / best_ours:>10,.0f} rows/s   ratio {best_psql / best_ours:.2f}   "
                f"our peak RSS {rss:.0f} MB"
            )
        lo, hi = min(args.sizes), max(args.sizes)
        print(f"peak RSS {hi:,} / {lo:,} rows: {results[hi] / results[lo]:.2f}x")
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
