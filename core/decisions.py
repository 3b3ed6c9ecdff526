"""The decision log: the `agent_decisions` table beside the bots' own, its one owner.

Every execute decision the agent server makes is a row: its id, when, the bot, the
data type, the input as the bots log it, the candidates (NULL: the bank of
`model_version`), the action chosen, the probability it was chosen with, whether
that was exploration, the whole ranking (each candidate's expected reward, lower
bound and probability), the model version, the exploration settings and the time the
model took per decision of its batch (`decide_ms`). The reward
is recorded once per decision, by `POST /reward` (`record_reward`) or by a row the
bots write to their own table naming the decision (`decision_id` in its output);
the nightly export joins them after a reward wait.

Beside it, `agent_shadow`: the Challenger's view of the same decisions (serving.shadow),
read back by `shadow_window` for the shadow report.

The tables are created on first use (`Log.ensure`), in whatever database the flows read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

TABLE = "agent_decisions"
SHADOW_TABLE = "agent_shadow"

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
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS decide_ms double precision;
CREATE INDEX IF NOT EXISTS {TABLE}_created_at ON {TABLE} (created_at);
"""

# The Challenger's view of the same decisions (serving.shadow): for each execute
# decision the shadow took up, the Challenger version, whether it scored it (`scored`),
# or why not (`skipped`: over the time budget; `error`: it raised; `missing`: the alias
# names a version this worker has not loaded), and when scored, its own ranking of the
# same candidates under the same exploration (each with its probability), the action
# it would have drawn, its first-ranked action, whether that is Production's first,
# the probability it gives the action Production served, and the time it took.
# Decisions skipped are counted, not written one by one (under full load most are, and
# a row apiece cost the worker a tenth of a millisecond per request): one row per
# worker, bot, Production version and reason every second or so, its id `skipped:...`,
# with the number of decisions it stands for in `decisions` (1 for every other row).
SHADOW_DDL = f"""
CREATE TABLE IF NOT EXISTS {SHADOW_TABLE} (
    decision_id        text NOT NULL,
    challenger_version text NOT NULL,
    created_at         timestamptz NOT NULL,
    bot                text NOT NULL,
    production_version text,
    outcome            text NOT NULL,
    reason             text,
    action             jsonb,
    first              jsonb,
    agrees             boolean,
    logged_probability double precision,
    ranking            jsonb,
    scoring_ms         double precision,
    decisions          integer NOT NULL DEFAULT 1,
    PRIMARY KEY (decision_id, challenger_version)
);
ALTER TABLE {SHADOW_TABLE} ADD COLUMN IF NOT EXISTS decisions integer NOT NULL DEFAULT 1;
CREATE INDEX IF NOT EXISTS {SHADOW_TABLE}_created_at ON {SHADOW_TABLE} (created_at);
"""


@dataclass(frozen=True)
class Log:
    """One append-only log table: its DDL, the columns a record fills, and its key (a
    record already written is left as it is: a retried request, a replayed spool)."""

    table: str
    ddl: str
    columns: tuple[str, ...]
    json_columns: frozenset[str]
    key: str

    @property
    def insert_sql(self) -> str:
        values = ", ".join(
            f"%({c})s::jsonb" if c in self.json_columns else f"%({c})s" for c in self.columns
        )
        return (
            f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES ({values}) "
            f"ON CONFLICT ({self.key}) DO NOTHING"
        )

    def row(self, record: dict) -> dict:
        """A record as the insert's parameters."""
        return {
            c: (None if record.get(c) is None else json.dumps(record[c]))
            if c in self.json_columns
            else record.get(c)
            for c in self.columns
        }

    def ensure(self, conn) -> None:
        """Create the table and its index if they are missing (idempotent; commits)."""
        with conn.cursor() as cur:
            # one at a time: two CREATE ... IF NOT EXISTS at once can collide on the catalog
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            cur.execute(self.ddl)
        conn.commit()

    def insert(self, conn, records: list[dict]) -> None:
        """Write records in one transaction."""
        with conn.cursor() as cur:
            cur.executemany(self.insert_sql, [self.row(r) for r in records])
        conn.commit()


DECISIONS = Log(
    TABLE,
    DDL,
    (
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
        "decide_ms",
    ),
    frozenset({"input", "candidates", "action", "ranking", "exploration"}),
    "id",
)
SHADOW = Log(
    SHADOW_TABLE,
    SHADOW_DDL,
    (
        "decision_id",
        "challenger_version",
        "created_at",
        "bot",
        "production_version",
        "outcome",
        "reason",
        "action",
        "first",
        "agrees",
        "logged_probability",
        "ranking",
        "scoring_ms",
        "decisions",
    ),
    frozenset({"action", "first", "ranking"}),
    "decision_id, challenger_version",
)


def connect(url: str, log: Log = DECISIONS):
    """A connection to the database of `log`, its table made sure of."""
    import psycopg

    conn = psycopg.connect(url, connect_timeout=5)
    try:
        log.ensure(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def ensure(conn) -> None:
    """Create the decision log's table and index if they are missing (idempotent)."""
    DECISIONS.ensure(conn)


def insert(conn, records: list[dict]) -> None:
    """Write decisions in one transaction; a decision already logged is left as it is
    (a retried request, a replayed spool)."""
    DECISIONS.insert(conn, records)


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
    for _ in range(2):  # a decision logged between the update and the look: once more
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
        if before[0] is not None:
            break
    stored, when, by = before
    if stored != reward:
        raise RewardConflict(
            f"decision {decision_id} already has the reward {stored:g} (recorded {when}); "
            "a decision's reward is recorded once"
        )
    return Recorded(stored, when, by, new=False)


def _select(conn, tables: tuple[str, ...], sql: str, params: tuple) -> list[dict]:
    """The rows of `sql` as dicts; none when one of `tables` does not exist yet (a log
    nobody has written to)."""
    with conn.cursor() as cur:
        cur.execute("SELECT " + ", ".join(["to_regclass(%s)"] * len(tables)), tables)
        if None in cur.fetchone():
            return []
        cur.execute(sql, params)
        names = [d.name for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def window(conn, since: datetime, until: datetime) -> list[dict]:
    """The decisions made in [since, until), oldest first, with their rewards."""
    return _select(
        conn,
        (TABLE,),
        f"SELECT id, created_at, bot, data_type, input::text, candidates::text, "
        f"action::text, probability, model_version, exploration::text, reward, "
        f"reward_at, reward_source FROM {TABLE} "
        "WHERE created_at >= %s AND created_at < %s ORDER BY created_at, id",
        (since, until),
    )


def shadow_window(conn, version: str, since: datetime, until: datetime) -> list[dict]:
    """The shadow's rows for Challenger `version` made in [since, until), oldest first,
    each with its decision's logged probability, action, ranking, reward and time (none
    for a row of skipped decisions, which stands for `decisions` of them)."""
    return _select(
        conn,
        (SHADOW_TABLE, TABLE),
        f"SELECT s.decision_id, s.created_at, s.bot, s.production_version, s.outcome, "
        f"s.reason, s.agrees, s.logged_probability, s.ranking::text AS shadow_ranking, "
        f"s.scoring_ms, s.decisions, d.probability, d.action::text AS action, "
        f"d.ranking::text AS ranking, d.reward, d.decide_ms "
        f"FROM {SHADOW_TABLE} s LEFT JOIN {TABLE} d ON d.id = s.decision_id "
        "WHERE s.challenger_version = %s AND s.created_at >= %s AND s.created_at < %s "
        "ORDER BY s.created_at, s.decision_id",
        (version, since, until),
    )


def unshadowed_times(conn, version: str, since: datetime, until: datetime) -> list[float]:
    """Production's time per decision (ms) in [since, until) for the decisions the shadow
    of `version` did not score: the cost's baseline."""
    rows = _select(
        conn,
        (SHADOW_TABLE, TABLE),
        f"SELECT d.decide_ms FROM {TABLE} d WHERE d.created_at >= %s AND d.created_at < %s "
        f"AND d.decide_ms IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {SHADOW_TABLE} s "
        "WHERE s.decision_id = d.id AND s.challenger_version = %s AND s.outcome = 'scored')",
        (since, until, version),
    )
    return [r["decide_ms"] for r in rows]
