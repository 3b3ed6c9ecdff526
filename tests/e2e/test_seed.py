"""`valifi seed-data` against real PostgreSQL: the embedded server and one in DATABASE_URL."""

from datetime import datetime, timedelta

import psycopg2
import pytest

from model.synthetic import BOTS, HARD_BOTS, World
from tests.helpers import valifi
from valifi.seed import SeedError, seed

pytestmark = pytest.mark.e2e

END = datetime(2026, 11, 20, 12, 0, 0)

APP_TYPES = {
    "id": "character varying",
    "bot_id": "character varying",
    "data_type": "text",
    "input": "jsonb",
    "expected_output": "jsonb",
    "actual_output": "jsonb",
    "reward": "numeric",
    "created_at": "timestamp without time zone",
}
DESIGN_TYPES = {
    "id": "bigint",
    "botId": "text",
    "dataType": "text",
    "input": "text",
    "actualOutput": "text",
    "reward": "double precision",
    "createdAt": "timestamp with time zone",
}


@pytest.fixture(params=["embedded", "database_url"])
def server(request):
    return request.getfixturevalue("embedded_pg" if request.param == "embedded" else "external_pg")


def _query(url, q, args=()):
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(q, args or None)
        rows = cur.fetchall()
    conn.close()
    return rows


def _types(url, table="bot_training_data"):
    return dict(
        _query(
            url,
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s",
            (table,),
        )
    )


@pytest.mark.parametrize("layout", ["app", "design"])
def test_cli_seeds_documented_types(server, fresh_db, layout, stack_env):
    url = fresh_db(server)
    env = {"DATABASE_URL": url}
    r = valifi("seed-data", "--rows", "3000", "--days", "5", "--layout", layout, env=env)
    assert r.returncode == 0, r.stderr
    assert _types(url) == (APP_TYPES if layout == "app" else DESIGN_TYPES)
    if layout == "app":
        q = (
            "SELECT b.name, d.data_type, d.input, d.actual_output, d.reward, d.created_at "
            "FROM bot_training_data d JOIN trading_bots b ON b.id = d.bot_id"
        )
        assert dict(_query(url, "SELECT name, strategy FROM trading_bots")).keys() == set(BOTS)
    else:
        q = (
            'SELECT "botId", "dataType", input::jsonb, "actualOutput"::jsonb, reward, '
            "\"createdAt\" AT TIME ZONE 'UTC' FROM bot_training_data"
        )
    rows = _query(url, q)
    assert len(rows) == 3000
    assert {r[0] for r in rows} == set(BOTS)
    assert {r[1] for r in rows} == {"market_data", "user_feedback", "strategy_result"}
    assert all(isinstance(r[2], dict) and r[2]["task"] for r in rows)
    assert all(r[3] in BOTS[r[0]].actions for r in rows)
    assert all(-1 <= float(r[4]) <= 1 for r in rows)
    newest, oldest = max(r[5] for r in rows), min(r[5] for r in rows)
    assert newest - oldest > timedelta(days=4)
    assert newest >= datetime.utcnow() - timedelta(minutes=5)


def test_cli_seeds_the_hard_world(external_pg, fresh_db):
    url = fresh_db(external_pg)
    r = valifi("seed-data", "--rows", "600", "--world", "hard", env={"DATABASE_URL": url})
    assert r.returncode == 0, r.stderr
    rows = _query(
        url,
        "SELECT b.name, d.actual_output FROM bot_training_data d "
        "JOIN trading_bots b ON b.id = d.bot_id",
    )
    assert len(rows) == 600
    assert all(out in HARD_BOTS[bot].actions for bot, out in rows)
    assert sum(out not in BOTS[bot].actions for bot, out in rows) > 300  # its own actions


@pytest.mark.parametrize("layout", ["app", "design"])
def test_same_seed_gives_same_rows(server, fresh_db, layout):
    a, b = fresh_db(server), fresh_db(server)
    for url in (a, b):
        seed(url, 800, layout=layout, world=World(seed=11), end=END)
    order = "created_at" if layout == "app" else '"createdAt"'
    cols = (
        "input::text, actual_output::text, reward::text"
        if layout == "app"
        else 'input, "actualOutput", reward::text'
    )
    q = f"SELECT {cols}, {order} FROM bot_training_data ORDER BY {order}, 1"
    assert _query(a, q) == _query(b, q)
    other = fresh_db(server)
    seed(other, 800, layout=layout, world=World(seed=12), end=END)
    assert _query(other, q) != _query(a, q)


def test_refuses_to_touch_a_table_with_rows_unless_asked(fresh_db, external_pg):
    url = fresh_db(external_pg)
    seed(url, 100, end=END)
    with pytest.raises(SeedError, match="already holds 100 rows"):
        seed(url, 100, end=END)
    assert seed(url, 100, end=END, mode="if-empty").rows == 0
    seed(url, 50, end=END, mode="append", world=World(seed=5))
    assert _query(url, "SELECT count(*) FROM bot_training_data") == [(150,)]
    assert _query(url, "SELECT count(*) FROM trading_bots") == [(len(BOTS),)]  # reused
    seed(url, 20, end=END, mode="replace")
    assert _query(url, "SELECT count(*) FROM bot_training_data") == [(20,)]
    with pytest.raises(SeedError, match="another layout"):
        seed(url, 20, end=END, mode="append", layout="design")


def test_bad_rows_reach_the_table(fresh_db, external_pg):
    from model.synthetic import BadRows

    for layout in ("app", "design"):
        url = fresh_db(external_pg)
        seed(
            url,
            1000,
            layout=layout,
            end=END,
            bad=BadRows(null_reward=0.1, out_of_range=0.01, malformed=0.02),
        )
        assert _query(url, "SELECT count(*) FROM bot_training_data WHERE reward IS NULL") == [
            (100,)
        ]
        assert _query(url, "SELECT count(*) FROM bot_training_data WHERE reward > 1") == [(10,)]
        kind = "jsonb_typeof(input) = 'string'" if layout == "app" else "input NOT LIKE '%}'"
        assert _query(url, f"SELECT count(*) FROM bot_training_data WHERE {kind}") == [(20,)]


def test_100k_rows_insert_in_seconds(fresh_db, external_pg):
    import time

    url = fresh_db(external_pg)
    t0 = time.perf_counter()
    seed(url, 100_000, days=30)
    elapsed = time.perf_counter() - t0
    assert _query(url, "SELECT count(*) FROM bot_training_data") == [(100_000,)]
    assert elapsed < 120, f"100k rows took {elapsed:.0f} s"
