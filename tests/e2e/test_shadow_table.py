"""`agent_shadow` in a real PostgreSQL: a table made before skipped decisions were
counted gains the count and keeps its rows, and the report reads both kinds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from core import decisions
from core.settings import GateSpec
from flows.shadow import summarise
from model.decision import skipped_record

pytestmark = [pytest.mark.e2e]

# the table as the first shadow made it (no `decisions` column)
BEFORE = """
CREATE TABLE agent_shadow (
    decision_id text NOT NULL, challenger_version text NOT NULL,
    created_at timestamptz NOT NULL, bot text NOT NULL, production_version text,
    outcome text NOT NULL, reason text, action jsonb, first jsonb, agrees boolean,
    logged_probability double precision, ranking jsonb, scoring_ms double precision,
    PRIMARY KEY (decision_id, challenger_version)
);
"""


def test_an_older_table_gains_the_count_and_the_report_weighs_rows_by_it(external_pg, fresh_db):
    url = fresh_db(external_pg)
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn:
        conn.execute(BEFORE)
        conn.execute(
            "INSERT INTO agent_shadow (decision_id, challenger_version, created_at, bot, "
            "production_version, outcome, reason) VALUES "
            "('d-1', '2', %s, 'bot', '1', 'skipped', 'over the time budget')",
            (now,),
        )
    decisions.connect(url).close()  # the decision log beside it
    conn = decisions.connect(url, decisions.SHADOW)  # made sure of: the column added
    try:
        tally = skipped_record("2", "bot", "1", "over the time budget", 41)
        decisions.SHADOW.insert(conn, [tally])
        decisions.SHADOW.insert(conn, [tally])  # a replayed spool: written once
        rows = decisions.shadow_window(conn, "2", now - timedelta(minutes=1), now + timedelta(1))
    finally:
        conn.close()
    assert sorted(r["decisions"] for r in rows) == [1, 41]
    rep = summarise(rows, GateSpec(ope_bootstrap=10), "1")
    assert rep["counts"]["skipped"] == rep["decisions"] == 42 and rep["rows"] == 2
    assert rep["reasons"] == {"over the time budget": 42}
