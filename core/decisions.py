"""The decision log: the `agent_decisions` table beside the bots' own, its one owner.

Every execute decision the agent server makes is a row: its id, when, the bot, the
data type, the input as the bots log it, the candidates (NULL: the bank of
`model_version`), the action chosen, the probability it was chosen with, whether
that was exploration, the whole ranking (each candidate's expected reward, lower
bound and probability), the model version and the exploration settings. The reward
is recorded once per decision, by `POST /reward` (`record_reward`) or by a row the
bots write to their own table naming the decision (`decision_id` in its output);
the nightly export joins them after a reward wait.

The table is created on first use (`ensure`), in whatever database the flows read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

TABLE = "agent_decisions"

DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id            text PRIMARY KEY,
    created_at    timestamptz NOT NULL,
    bot           text NOT NULL,
    data_type     text,
    input         jsonb NOT NULL,
    candidates    jsonb,
    action        jsonb NOT NULL,
    probability   double precision NOT NULL,
    explored      boolean NOT NULL,
    ranking       jsonb NOT NULL,
    model_version text,
    exploration   jsonb NOT NULL,
    reward        double precision,
    reward_at     timestamptz,
    reward_source text
);
CREATE INDEX IF NOT EXISTS {TABLE}_created_at ON {TABLE} (created_at);
"""

COLUMNS = (
    "id",
    "created_at",
    "bot",
    "data_type",
    "input",
    "candidates",
    "action",
    "probability",
    "explored",
    "ranking",
    "model_version",
    "exploration",
)
JSON_COLUMNS = {"input", "candidates", "action", "ranking", "exploration"}

INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ("
    + ", ".join(f"%({c})s::jsonb" if c in JSON_COLUMNS else f"%({c})s" for c in COLUMNS)
    + ") ON CONFLICT (id) DO NOTHING"
)


def connect(url: str):
    """A connection to the decision log's database, the table made sure of."""
    import psycopg

    conn = psycopg.connect(url, connect_timeout=5)
    try:
        ensure(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def ensure(conn) -> None:
    """Create the table and its index if they are missing (idempotent; commits)."""
    with conn.cursor() as cur:
        # one at a time: two CREATE ... IF NOT EXISTS at once can collide on the catalog
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
        cur.execute(DDL)
    conn.commit()


def row(record: dict) -> dict:
    """A decision record (model.decision) as the insert's parameters."""
    return {
        c: (None if record.get(c) is None else json.dumps(record[c]))
        if c in JSON_COLUMNS
        else record.get(c)
        for c in COLUMNS
    }


def insert(conn, records: list[dict]) -> None:
    """Write decisions in one transaction; a decision already logged is left as it is
    (a retried request, a replayed spool)."""
    with conn.cursor() as cur:
        cur.executemany(INSERT, [row(r) for r in records])
    conn.commit()


class UnknownDecision(LookupError):
    """No decision with this id is logged."""


class RewardConflict(ValueError):
    """The decision already has another reward; the first one stands."""


@dataclass
class Recorded:
    reward: float
    at: datetime
    source: str
    new: bool  # False: this reward had been recorded before (a retry)


def record_reward(conn, decision_id: str, reward: float, at: datetime, source: str) -> Recorded:
    """Record a decision's reward once. A retry with the same reward returns the first
    record; another reward for the same decision is a RewardConflict."""
    with conn.cursor() as cur:
        cur.execute(
            f"UPDATE {TABLE} SET reward = %s, reward_at = %s, reward_source = %s "
            "WHERE id = %s AND reward IS NULL RETURNING reward, reward_at, reward_source",
            (reward, at, source, decision_id),
        )
        new = cur.fetchone()
        if new is None:
            cur.execute(
                f"SELECT reward, reward_at, reward_source FROM {TABLE} WHERE id = %s",
                (decision_id,),
            )
            before = cur.fetchone()
    conn.commit()
    if new is not None:
        return Recorded(*new, new=True)
    if before is None:
        raise UnknownDecision(decision_id)
    stored, when, by = before
    if stored != reward:
        raise RewardConflict(
            f"decision {decision_id} already has the reward {stored:g} (recorded {when}); "
            "a decision's reward is recorded once"
        )
    return Recorded(stored, when, by, new=False)


def window(conn, since: datetime, until: datetime) -> list[dict]:
    """The decisions made in [since, until), oldest first, with their rewards."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (TABLE,))
        if cur.fetchone()[0] is None:
            return []
        cur.execute(
            f"SELECT id, created_at, bot, data_type, input::text, candidates::text, "
            f"action::text, probability, model_version, exploration::text, reward, "
            f"reward_at, reward_source FROM {TABLE} "
            "WHERE created_at >= %s AND created_at < %s ORDER BY created_at, id",
            (since, until),
        )
        names = [d.name for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
