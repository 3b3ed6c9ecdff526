"""Fill `bot_training_data` with synthetic interactions, in either source layout.

Layout "app" is the production application's (snake_case, jsonb, a `trading_bots`
table whose `name` is the agent type); layout "design" is the one the original
design's export query assumes (quoted camelCase, text payloads, bot names inline).
Rows go in with COPY, so 100,000 rows take seconds.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass
from datetime import UTC
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
import psycopg2
from psycopg2 import sql

from model.synthetic import BOTS, BadRows, World

LAYOUTS = ("app", "design")

_APP_DDL = """
CREATE TABLE IF NOT EXISTS {bots} (
    id        varchar PRIMARY KEY DEFAULT gen_random_uuid()::text,
    name      text NOT NULL,
    strategy  text NOT NULL
);
CREATE TABLE IF NOT EXISTS {table} (
    id              varchar PRIMARY KEY DEFAULT gen_random_uuid()::text,
    bot_id          varchar NOT NULL REFERENCES {bots}(id),
    data_type       text NOT NULL,
    input           jsonb NOT NULL,
    expected_output jsonb,
    actual_output   jsonb,
    reward          numeric(10, 4),
    created_at      timestamp DEFAULT now()
);
"""

_DESIGN_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id             bigserial PRIMARY KEY,
    "botId"        text NOT NULL,
    "dataType"     text NOT NULL,
    input          text NOT NULL,
    "actualOutput" text,
    reward         double precision,
    "createdAt"    timestamptz NOT NULL DEFAULT now()
);
"""


class SeedError(RuntimeError):
    """Seeding refused or failed; the message says why."""


@dataclass
class SeedResult:
    layout: str
    rows: int
    bots: dict[str, str]  # agent type -> bot id as stored


def _table_rows(cur, table: str) -> int | None:
    cur.execute("SELECT to_regclass(%s)", (table,))
    if cur.fetchone()[0] is None:
        return None
    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
    return cur.fetchone()[0]


def _columns(cur, table: str) -> set[str]:
    cur.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    )
    return {r[0] for r in cur.fetchall()}


def _prepare(cur, layout: str, table: str, bots_table: str, mode: str) -> None:
    """Create the tables, or check that what exists may be written to."""
    existing = _table_rows(cur, table)
    if existing is not None and mode == "replace":
        cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
        existing = None
    if existing and mode == "refuse":
        raise SeedError(
            f"table {table!r} already holds {existing} rows; pass --append to add to it "
            f"or --replace to drop and recreate it"
        )
    if existing is not None:
        wanted = "bot_id" if layout == "app" else "botId"
        if wanted not in _columns(cur, table):
            raise SeedError(f"table {table!r} exists with another layout than {layout!r}")
    ddl = _APP_DDL if layout == "app" else _DESIGN_DDL
    cur.execute(sql.SQL(ddl).format(table=sql.Identifier(table), bots=sql.Identifier(bots_table)))


def _app_bots(cur, bots_table: str, seed: int) -> dict[str, str]:
    """Ids of the bots' rows in the bots table, inserting those missing."""
    ids = {}
    for name, bot in BOTS.items():
        cur.execute(
            sql.SQL("SELECT id FROM {} WHERE name = %s ORDER BY id LIMIT 1").format(
                sql.Identifier(bots_table)
            ),
            (name,),
        )
        row = cur.fetchone()
        if row is None:
            bot_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"valifi-bot/{seed}/{name}"))
            cur.execute(
                sql.SQL("INSERT INTO {} (id, name, strategy) VALUES (%s, %s, %s)").format(
                    sql.Identifier(bots_table)
                ),
                (bot_id, name, bot.strategy),
            )
        else:
            bot_id = row[0]
        ids[name] = bot_id
    return ids


def _payload(value) -> str:
    """A JSON payload as stored: dicts as JSON; a malformed (string) payload as is."""
    return value if isinstance(value, str) else json.dumps(value)


def _database_zone(cur) -> ZoneInfo:
    """The database's TimeZone: the zone `DEFAULT now()` writes a naive column in."""
    cur.execute("SHOW TimeZone")
    name = cur.fetchone()[0]
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SeedError(
            f"the database's TimeZone {name!r} is not a zone name this machine knows; "
            "set it to one (ALTER DATABASE ... SET TimeZone = 'UTC')"
        ) from None


def _csv(
    df: pd.DataFrame, layout: str, bot_ids: dict[str, str], zone: ZoneInfo | None = None
) -> io.StringIO:
    """Rows as CSV; `zone`: write times (UTC in `df`) as local times of that zone, for
    a column without a time zone, as an application's `DEFAULT now()` would."""
    buf = io.StringIO()
    w = csv.writer(buf)
    for r in df.itertuples(index=False):
        reward = "" if pd.isna(r.reward) else f"{r.reward:.4f}"
        when = r.created_at.isoformat(sep=" ")
        if layout == "app":
            if zone is not None:
                local = r.created_at.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)
                when = local.isoformat(sep=" ")
            # jsonb cannot hold a truncated document: keep it as a JSON string instead.
            inp = json.dumps(r.input)
            w.writerow([r.id, bot_ids[r.bot], r.data_type, inp, json.dumps(r.action), reward, when])
        else:
            w.writerow(
                [r.bot, r.data_type, _payload(r.input), json.dumps(r.action), reward, when + "+00"]
            )
    buf.seek(0)
    return buf


def seed(
    url: str,
    rows: int,
    days: float = 7.0,
    layout: str = "app",
    world: World | None = None,
    bad: BadRows | None = None,
    mode: str = "refuse",
    table: str = "bot_training_data",
    bots_table: str = "trading_bots",
    end=None,
) -> SeedResult:
    """Generate `rows` interactions and COPY them in, in one transaction.

    `mode`: "refuse" (default: never touch a table that holds rows), "append",
    "replace" (drop and recreate the data table) or "if-empty" (insert nothing,
    returning 0 rows, when the table holds rows).
    """
    if layout not in LAYOUTS:
        raise SeedError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    world = world or World()
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            if mode == "if-empty":
                if _table_rows(cur, table):
                    return SeedResult(layout=layout, rows=0, bots={})
                mode = "append"
            df = world.generate(rows, days=days, end=end, bad=bad)
            _prepare(cur, layout, table, bots_table, mode)
            if layout == "app":
                bot_ids = _app_bots(cur, bots_table, world.seed)
                cols = [
                    "id",
                    "bot_id",
                    "data_type",
                    "input",
                    "actual_output",
                    "reward",
                    "created_at",
                ]
            else:
                bot_ids = {name: name for name in BOTS}
                cols = ["botId", "dataType", "input", "actualOutput", "reward", "createdAt"]
            copy = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols))
            )
            zone = _database_zone(cur) if layout == "app" else None
            cur.copy_expert(copy.as_string(conn), _csv(df, layout, bot_ids, zone))
        return SeedResult(layout=layout, rows=len(df), bots=bot_ids)
    finally:
        conn.close()
