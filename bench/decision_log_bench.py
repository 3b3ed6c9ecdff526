"""The decision log's sustained insert rate, and what a decision weighs on disk.

    python3 scripts/bench.py decision_log_bench [--url URL] [--rows 100000] [--batch 256]

Writes `--rows` decision records as the agent server's workers do (core.decisions:
batches of `--batch` in one transaction each, ON CONFLICT DO NOTHING) into a
throw-away embedded PostgreSQL (or the database at `--url`), with the records an
execute request over the synthetic world's trading bot makes (its bank of four
actions). Prints rows per second, the table's bytes per row (data, index and
TOAST), and what a day weighs at 100 and at 10,000 decisions per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from core import decisions
from model.synthetic import World


def records(n: int) -> list[dict]:
    """`n` decision records shaped as model.decision makes them."""
    world = World(seed=3)
    df = world.generate(min(n, 2000), days=1)
    bank = world.bots["trading_advanced"].actions
    out = []
    for i in range(n):
        x = df["input"].iloc[i % len(df)]
        ranking = [
            {"action": a, "expected_reward": 0.1 * k, "lower_bound": 0.05 * k, "probability": 0.25}
            for k, a in enumerate(bank)
        ]
        out.append(
            {
                "id": str(uuid.uuid4()),
                "created_at": datetime.now(UTC).isoformat(),
                "bot": "trading_advanced",
                "data_type": "market_data",
                "input": x,
                "candidates": None,
                "action": bank[0],
                "probability": 0.925,
                "explored": False,
                "ranking": ranking,
                "model_version": "7",
                "exploration": {
                    "exploration": "epsilon",
                    "epsilon": 0.1,
                    "temperature": 0.05,
                    "min_probability": 0.01,
                },
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a database to write to (default: a throw-away embedded one)")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    server = None
    if args.url is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        server = pgserver.get_server(Path(tempfile.mkdtemp()), cleanup_mode="delete")
        args.url = server.get_uri()
    try:
        batch = records(args.rows)
        with psycopg.connect(args.url) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {decisions.TABLE}")
            conn.commit()
            decisions.ensure(conn)
            started = time.perf_counter()
            for i in range(0, len(batch), args.batch):
                decisions.insert(conn, batch[i : i + args.batch])
            seconds = time.perf_counter() - started
            size = conn.execute("SELECT pg_total_relation_size(%s)", (decisions.TABLE,)).fetchone()[
                0
            ]
        per_row = size / args.rows
        print(
            f"{args.rows:,} decisions in batches of {args.batch}: {args.rows / seconds:,.0f} rows/s"
        )
        print(f"{per_row:,.0f} bytes per decision on disk (table, index, TOAST)")
        for rate in (100, 10_000):
            day = rate * 86_400 * per_row
            print(f"{rate:>6} decisions/s: {rate * 86_400:,} a day, {day / 2**30:,.1f} GiB a day")
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
