"""Export and validation against real PostgreSQL, in both source layouts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import psycopg2
import pyarrow.parquet as pq
import pytest

from flows import export as export_mod
from flows.export import ExportSpec, InsufficientData, export_snapshot
from flows.source import SourceError
from flows.validate import ValidationSpec, validate_snapshot
from model.snapshot import Manifest
from model.synthetic import BOTS, BadRows, World
from tests.helpers import valifi
from valifi.seed import seed

pytestmark = pytest.mark.e2e

NOW = datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def _execute(url: str, statement: str) -> None:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(statement)
    conn.close()


@pytest.fixture(params=["app", "design"])
def layout(request):
    return request.param


@pytest.fixture
def seeded(fresh_db, external_pg, layout):
    """3,000 rows over 10 days (about 2,100 of them in the default 7-day window)."""
    url = fresh_db(external_pg)
    seed(url, 3000, days=10, layout=layout, world=World(seed=5), end=NOW)
    return url


def test_clean_export(seeded, layout, tmp_path):
    snap = export_snapshot(seeded, ExportSpec(limit=100_000), tmp_path)
    m = Manifest.read(snap)
    table = pq.read_table(snap / "data.parquet")
    df = table.to_pandas()

    assert m.rows == len(df) and 1800 < m.rows < 2400  # only the last 7 of 10 days
    assert m.layout == layout
    assert m.null_reward_rows == 0 and m.bad_input_rows == 0
    assert str(table.schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    assert str(table.schema.field("reward").type) == "double"
    assert df["created_at"].is_monotonic_decreasing  # newest first
    since = datetime.fromisoformat(m.window["since"])
    until = datetime.fromisoformat(m.window["until"])
    assert df["created_at"].min() >= since and df["created_at"].max() < until
    assert datetime.fromisoformat(m.watermark) == df["created_at"].max()
    assert set(df["bot"]) == set(BOTS)  # names, not ids, in both layouts
    assert m.bots == df["bot"].value_counts().sort_index().to_dict()
    if layout == "app":
        assert not (set(df["bot_id"]) & set(BOTS))  # ids are uuids beside the names
    inputs = [json.loads(x) for x in df["input"]]
    assert all(isinstance(x, dict) and x["task"] for x in inputs)
    assert all(
        json.loads(a) in BOTS[b].actions for a, b in zip(df["action"], df["bot"], strict=True)
    )
    assert '"bot_training_data"' in m.query and "%(limit)s" in m.query
    assert len(m.sha256) == 64


def test_limit_and_window_and_stable_sha(seeded, tmp_path):
    a = Manifest.read(
        export_snapshot(
            seeded, ExportSpec(limit=500, until=NOW + timedelta(seconds=1)), tmp_path / "a"
        )
    )
    b_snap = export_snapshot(
        seeded, ExportSpec(limit=500, until=NOW + timedelta(seconds=1)), tmp_path / "b"
    )
    b = Manifest.read(b_snap)
    assert a.rows == 500 and a.sha256 == b.sha256  # same data, same sha256
    # the same rows again, into the same folder at once: a snapshot of its own
    again = [
        export_snapshot(
            seeded, ExportSpec(limit=500, until=NOW + timedelta(seconds=1)), b_snap.parent
        )
        for _ in range(2)
    ]
    assert len({b_snap, *again}) == 3 and all(Manifest.read(p).rows == 500 for p in again)
    c = Manifest.read(export_snapshot(seeded, ExportSpec(limit=501), tmp_path / "c"))
    assert c.sha256 != a.sha256
    short = Manifest.read(
        export_snapshot(seeded, ExportSpec(days=1, limit=100_000, min_rows=0), tmp_path / "d")
    )
    assert 200 < short.rows < 400


def test_share_of_each_bot_is_compared_with_the_last_snapshot_that_passed(seeded, layout, tmp_path):
    first = export_snapshot(seeded, ExportSpec(), tmp_path)
    result = validate_snapshot(first)
    assert result.success and result.reference is None  # nothing to compare with yet
    df = pq.read_table(first / "data.parquet").to_pandas()
    gone = df["bot"].value_counts().index[0]
    share = (df["bot"] == gone).mean()
    column = "bot_id" if layout == "app" else '"botId"'
    bot_id = df.loc[df["bot"] == gone, "bot_id"].iloc[0]
    _execute(seeded, f"DELETE FROM bot_training_data WHERE {column} = '{bot_id}'")

    second = export_snapshot(seeded, ExportSpec(), tmp_path)
    strict = ValidationSpec(max_share_change=share / 2)
    result = validate_snapshot(second, strict)
    assert not result.success and result.reference == first.name
    [failure] = result.failures
    assert failure.expectation == "share of each bot" and failure.column == "bot"
    assert f"{gone!r} {share:.1%} -> 0.0%" in failure.line()
    # a failed snapshot is never the reference: the next one is compared with the first
    third = export_snapshot(seeded, ExportSpec(), tmp_path)
    assert validate_snapshot(third, strict).reference == first.name
    loose = validate_snapshot(third, ValidationSpec(max_share_change=share * 2))
    assert loose.success and loose.reference == first.name


def test_two_sources_in_one_snapshot_folder_never_compare_with_each_other(
    fresh_db, external_pg, tmp_path
):
    """Staging then production (or a second table) exported into one folder: each
    snapshot's shares are compared with its own source's snapshots only."""
    staging, production = fresh_db(external_pg), fresh_db(external_pg)
    seed(staging, 1500, world=World(seed=1, only=("trading_advanced",)), end=NOW, days=6)
    seed(production, 1500, world=World(seed=2), end=NOW, days=6)
    first = export_snapshot(staging, ExportSpec(), tmp_path)
    assert validate_snapshot(first).success
    other = export_snapshot(production, ExportSpec(), tmp_path)
    m_first, m_other = Manifest.read(first), Manifest.read(other)
    assert m_first.source_id != m_other.source_id
    assert m_first.source["database"] != m_other.source["database"]
    assert m_first.source["cluster"] == m_other.source["cluster"]  # one server, two databases
    assert m_first.source["table"] == "bot_training_data" and m_first.source["layout"] == "app"
    result = validate_snapshot(other)  # one bot at 100% against four at ~25%: unrelated
    assert result.success and result.reference is None
    assert result.compared() == "first snapshot of this source: shares not compared"
    again = export_snapshot(staging, ExportSpec(), tmp_path)
    assert validate_snapshot(again).reference == first.name  # not the newer `other`
    assert Manifest.read(again).source_id == m_first.source_id


def test_a_real_change_in_the_mix_is_accepted_once_and_becomes_the_reference(
    fresh_db, external_pg, tmp_path
):
    url = fresh_db(external_pg)
    three = ("trading_advanced", "financial_stocks", "analytics_portfolio")
    seed(url, 2000, world=World(seed=1, only=three), end=NOW, days=6)
    first = export_snapshot(url, ExportSpec(), tmp_path)
    assert validate_snapshot(first).success
    # a new bot goes live at a third of the rows
    seed(
        url,
        1000,
        world=World(seed=2, only=("platform_onboarding",)),
        end=NOW,
        days=6,
        mode="append",
    )
    second = export_snapshot(url, ExportSpec(), tmp_path)
    failed = validate_snapshot(second)
    assert not failed.success and failed.acceptable and failed.reference == first.name
    assert "'platform_onboarding' 0.0% -> 33.3%" in failed.reason()
    command = f'valifi validate {second} --accept --reason "<why>"'
    assert command in failed.reason()

    no_reason = valifi("validate", str(second), "--accept", env={})
    assert no_reason.returncode == 1 and "--reason is required" in no_reason.stderr
    still = export_snapshot(url, ExportSpec(), tmp_path)
    assert validate_snapshot(still).reference == first.name  # not accepted: still fails
    assert not validate_snapshot(still).success

    ok = valifi("validate", str(second), "--accept", "--reason", "onboarding went live", env={})
    assert ok.returncode == 0, ok.stderr
    record = json.loads((second / "acceptance.json").read_text())
    assert record["reason"] == "onboarding went live" and "@" in record["by"]
    assert record["sha256"] == Manifest.read(second).sha256
    assert any("platform_onboarding" in line for line in record["accepted"])
    after = export_snapshot(url, ExportSpec(), tmp_path)
    passed = validate_snapshot(after)
    assert passed.success and passed.reference == second.name
    assert "accepted by" in passed.compared() and "onboarding went live" in passed.compared()


def test_only_a_change_in_shares_can_be_accepted(fresh_db, external_pg, tmp_path):
    url = fresh_db(external_pg)
    seed(url, 1000, world=World(seed=3), end=NOW, days=6, bad=BadRows(out_of_range=0.05))
    snap = export_snapshot(url, ExportSpec(), tmp_path)
    result = validate_snapshot(snap)
    assert not result.success and not result.acceptable and "--accept" not in result.reason()
    r = valifi("validate", str(snap), "--accept", "--reason", "looks fine to me", env={})
    assert r.returncode == 1 and "only a change in the shares" in r.stderr
    assert "expect_column_values_to_be_between on reward" in r.stderr
    assert not (snap / "acceptance.json").exists()


def test_key_order_and_whitespace_do_not_change_the_snapshot(fresh_db, external_pg, tmp_path):
    url = fresh_db(external_pg)
    seed(url, 120, layout="design", world=World(seed=1), end=NOW, days=6)
    _execute(
        url,
        'UPDATE bot_training_data SET input = \'{ "b": 1,   "a": {"y": 2, "x": 3}}\' WHERE id = 1',
    )
    snap = export_snapshot(url, ExportSpec(), tmp_path)
    df = pq.read_table(snap / "data.parquet").to_pandas().set_index("id")
    assert json.loads(df.loc["1", "input"]) == {"a": {"x": 3, "y": 2}, "b": 1}
    _execute(url, 'UPDATE bot_training_data SET input = \'{"a":{"x":3,"y":2},"b":1}\' WHERE id = 1')
    again = pq.read_table(export_snapshot(url, ExportSpec(), tmp_path / "2") / "data.parquet")
    assert again.to_pandas().set_index("id").loc["1", "input"] == df.loc["1", "input"]


def test_bad_rows_fail_the_right_expectations(fresh_db, external_pg, layout, tmp_path):
    url = fresh_db(external_pg)
    bad = BadRows(null_reward=0.3, out_of_range=0.02, malformed=0.05)
    seed(url, 2000, layout=layout, world=World(seed=9), end=NOW, days=6, bad=bad)
    snap = export_snapshot(url, ExportSpec(), tmp_path)
    m = Manifest.read(snap)
    assert m.null_reward_rows == 600 and m.bad_input_rows == 100
    result = validate_snapshot(snap, ValidationSpec())
    assert not result.success
    failed = {(f.expectation, f.column) for f in result.failures}
    assert failed == {
        ("expect_column_values_to_be_between", "reward"),
        ("expect_column_values_to_not_be_null", "reward"),
        ("expect_column_values_to_be_in_set", "input_ok"),
    }
    reason = result.reason()
    assert "30.00% unexpected" in reason and "5.00% unexpected" in reason and "50.0" in reason
    assert (snap / "validation" / "index.html").is_file()
    assert json.loads((snap / "validation.json").read_text())["success"] is False


def test_clean_snapshot_passes_and_other_limits_are_enforced(seeded, tmp_path):
    snap = export_snapshot(seeded, ExportSpec(), tmp_path)
    assert validate_snapshot(snap).success
    strict = validate_snapshot(snap, ValidationSpec(data_types=["market_data"]), min_rows=5000)
    failed = {f.expectation for f in strict.failures}
    assert failed == {"expect_column_values_to_be_in_set", "expect_table_row_count_to_be_between"}


def test_empty_and_too_small_tables(fresh_db, external_pg, tmp_path):
    url = fresh_db(external_pg)
    seed(url, 42, world=World(seed=3), end=NOW, days=6)
    with pytest.raises(
        InsufficientData, match=r"insufficient data: 42 trainable rows .* of 42 exported < 100"
    ):
        export_snapshot(url, ExportSpec(), tmp_path)
    _execute(url, "DELETE FROM bot_training_data")
    with pytest.raises(
        InsufficientData, match=r"insufficient data: 0 trainable rows .* of 0 exported < 100"
    ):
        export_snapshot(url, ExportSpec(), tmp_path)
    assert list(tmp_path.iterdir()) == []  # no snapshot, no temporary folder


def test_the_minimum_counts_trainable_rows_not_raw_ones(fresh_db, external_pg, tmp_path):
    url = fresh_db(external_pg)
    seed(url, 130, world=World(seed=3), end=NOW, days=6, bad=BadRows(null_reward=0.4))
    with pytest.raises(InsufficientData, match=r"insufficient data: \d+ trainable .* of 130 "):
        export_snapshot(url, ExportSpec(), tmp_path)
    m = Manifest.read(export_snapshot(url, ExportSpec(min_rows=10), tmp_path))
    assert m.rows == 130 and m.trainable_rows == 130 - m.null_reward_rows < 100


def test_malicious_table_name_is_quoted_not_executed(fresh_db, external_pg, tmp_path):
    url = fresh_db(external_pg)
    seed(url, 150, world=World(seed=3), end=NOW, days=6)
    evil = 'bot_training_data"; DROP TABLE trading_bots; --'
    with pytest.raises(SourceError, match="does not exist"):
        export_snapshot(url, ExportSpec(table=evil), tmp_path)
    # a table that really has such a name is exported, quoted
    _execute(url, f'ALTER TABLE bot_training_data RENAME TO "{evil.replace(chr(34), chr(34) * 2)}"')
    snap = export_snapshot(url, ExportSpec(table=evil), tmp_path)
    assert Manifest.read(snap).rows == 150
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM trading_bots")
        assert cur.fetchone()[0] == len(BOTS)
    conn.close()


def test_explicit_column_mapping_for_another_schema(fresh_db, external_pg, tmp_path):
    url = fresh_db(external_pg)
    seed(url, 300, layout="design", world=World(seed=3), end=NOW, days=6)
    _execute(
        url,
        'ALTER TABLE bot_training_data RENAME COLUMN "botId" TO agent;'
        'ALTER TABLE bot_training_data RENAME COLUMN "createdAt" TO ts',
    )
    with pytest.raises(SourceError, match="no column for bot_id"):
        export_snapshot(url, ExportSpec(), tmp_path)
    snap = export_snapshot(
        url, ExportSpec(columns={"bot_id": "agent", "created_at": "ts"}), tmp_path
    )
    m = Manifest.read(snap)
    assert m.layout == "custom" and m.rows == 300 and set(m.bots) == set(BOTS)


def test_database_stopped_mid_export_leaves_no_snapshot(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        url = server.get_uri()
        seed(url, 60_000, days=5, world=World(seed=2), end=NOW)
        stopped = threading.Event()
        original = export_mod._ChunkWriter._write_batch

        def write_then_stop(self, batch):
            original(self, batch)
            if not stopped.is_set():  # first chunk on disk: now the database goes away
                stopped.set()
                server.get_postmaster_info().process.send_signal(2)  # fast shutdown
                server.get_postmaster_info().process.wait(20)

        monkeypatch.setattr(export_mod._ChunkWriter, "_write_batch", write_then_stop)
        out = tmp_path / "snapshots"
        with pytest.raises(Exception, match=r"terminat|closed|lost|server"):
            export_snapshot(url, ExportSpec(limit=100_000, chunk_bytes=1 << 20), out)
        assert stopped.is_set()
        assert list(out.iterdir()) == []
    finally:
        server.cleanup()


def test_cli_export_and_validate(seeded, tmp_path):
    r = valifi("export", "--out", str(tmp_path), env={"DATABASE_URL": seeded})
    assert r.returncode == 0, r.stderr
    snap = Path(r.stdout.strip().splitlines()[-1].removeprefix("snapshot: "))
    assert json.loads(r.stdout[: r.stdout.rindex("}") + 1])["rows"] == Manifest.read(snap).rows
    ok = valifi("validate", str(snap), env={})
    assert ok.returncode == 0 and "validation passed" in ok.stdout
    strict = valifi("validate", str(snap), "--min-rows", "100000", env={})
    assert strict.returncode == 1
    assert "expect_table_row_count_to_be_between" in strict.stderr
    small = valifi(
        "export", "--out", str(tmp_path), "--min-rows", "100000", env={"DATABASE_URL": seeded}
    )
    assert small.returncode != 0 and "insufficient data" in small.stderr


# Strings that CSV readers commonly take for NULL; all are real names here.
NULL_LOOKING = ["NA", "null", "N/A", "None", "", "NaN", "NULL", "nan", "#N/A", "n/a"]


def _messy_rows(url: str, layout: str, until: datetime) -> None:
    """Rows as applications write them, in a database whose TimeZone is Asia/Tokyo and
    whose DateStyle is not ISO: NULL-looking bot and data-type names, and rows just
    inside and just outside the window's ends."""
    db = urlsplit(url).path.lstrip("/")  # (a socket URL keeps its host in the query)
    _execute(url, f"ALTER DATABASE \"{db}\" SET TimeZone = 'Asia/Tokyo'")
    _execute(url, f"ALTER DATABASE \"{db}\" SET DateStyle = 'SQL, DMY'")
    since = until - timedelta(days=3)
    times = [until - timedelta(seconds=1), since + timedelta(seconds=1), since - timedelta(hours=1)]
    times += [until + timedelta(minutes=30), until - timedelta(hours=5)]
    with psycopg2.connect(url) as conn, conn.cursor() as cur:  # a session in Tokyo time
        for i, name in enumerate(NULL_LOOKING):
            when = times[i % len(times)]
            payload = json.dumps({"task": name or "empty", "note": "null", "x": -0.0})
            action = json.dumps({"action": name})
            if layout == "app":
                cur.execute(
                    "INSERT INTO trading_bots (id, name, strategy) VALUES (%s, %s, 'grid')",
                    (f"bot-{i}", name),
                )
                # a naive column holds Tokyo wall-clock time, as DEFAULT now() writes it
                cur.execute(
                    "INSERT INTO bot_training_data (id, bot_id, data_type, input, actual_output,"
                    " reward, created_at) VALUES (%s, %s, %s, %s, %s, 0.5,"
                    " (%s::timestamptz AT TIME ZONE 'Asia/Tokyo'))",
                    (f"messy-{i}", f"bot-{i}", name, payload, action, when),
                )
            else:
                cur.execute(
                    'INSERT INTO bot_training_data ("botId", "dataType", input, "actualOutput",'
                    ' reward, "createdAt") VALUES (%s, %s, %s, %s, 0.5, %s)',
                    (name, name, payload, action, when),
                )
    conn.close()


def test_null_looking_names_and_a_tokyo_database_export_exactly(
    fresh_db, external_pg, layout, tmp_path
):
    url = fresh_db(external_pg)
    until = datetime.now(UTC).replace(microsecond=0)
    seed(url, 200, days=4, layout=layout, world=World(seed=3), end=until.replace(tzinfo=None))
    _messy_rows(url, layout, until)
    spec = ExportSpec(until=until, days=3, limit=100_000, min_rows=0)
    m = Manifest.read(snap := export_snapshot(url, spec, tmp_path / "all"))
    df = pq.read_table(snap / "data.parquet").to_pandas().set_index("id")

    # the truth, from SQL in a session of its own (Tokyo time, as the database says)
    if layout == "app":
        truth_sql = (
            "SELECT d.id::text, b.name, d.data_type FROM bot_training_data d"
            " JOIN trading_bots b ON b.id = d.bot_id WHERE"
            " (d.created_at AT TIME ZONE 'Asia/Tokyo') >= %(since)s"
            " AND (d.created_at AT TIME ZONE 'Asia/Tokyo') < %(until)s"
        )
    else:
        truth_sql = (
            'SELECT id::text, "botId", "dataType" FROM bot_training_data'
            ' WHERE "createdAt" >= %(since)s AND "createdAt" < %(until)s'
        )
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(truth_sql, {"since": until - timedelta(days=3), "until": until})
        truth = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
    conn.close()

    assert set(df.index) == set(truth)  # the window, whatever the server's zone and style
    assert {i: (r.bot, r.data_type) for i, r in df.iterrows()} == truth  # names unchanged
    assert m.rows == m.window_rows == len(truth) and not m.limit_cut
    inside = {name for i, name in enumerate(NULL_LOOKING) if i % 5 in (0, 1, 4)}
    assert inside <= set(df["bot"]) and not df["bot"].isna().any()
    assert m.null_bot_rows == 0 and m.null_data_type_rows == 0
    assert sum(m.bots.values()) == m.rows
    created = df["created_at"].dt.tz_convert("UTC")
    assert created.min() >= pd.Timestamp(until - timedelta(days=3))
    assert created.max() < pd.Timestamp(until)
    if layout == "app":
        assert m.naive_timezone == "Asia/Tokyo"

    cut = Manifest.read(
        export_snapshot(url, spec.model_copy(update={"limit": 10}), tmp_path / "cut")
    )
    assert cut.rows == 10 and cut.window_rows == len(truth) and cut.limit_cut


# (payload as the application stored it, exported unchanged?) for the "design" layout's
# text column; the app layout's jsonb cannot hold what it refuses (NUL, invalid JSON)
PAYLOADS = [
    ('{"task": "emoji \U0001f680 and \u05e9\u05dc\u05d5\u05dd", "x": -0}', True),
    ('{"task": "nul \\u0000 inside", "x": 1}', True),
    ('{"task": "deep", "d": ' + '{"a": ' * 60 + "1" + "}" * 60 + "}", True),
    ('{"task": "big", "blob": "' + "x" * 1_000_000 + '"}', True),
    # valid JSON; jsonb holds it (exported as is), a float cannot (set aside)
    ('{"task": "huge int", "n": 1' + "0" * 400 + "}", None),
    ('{"task": "cut off", "x": ', False),
    ("[1, 2, 3]", False),
    ("NA", False),
]


@pytest.mark.parametrize("server", ["external_pg", "embedded_pg"])  # 15: we parse; 16: it does
def test_unreadable_payloads_are_set_aside_with_reasons_and_the_rest_exported_unchanged(
    fresh_db, server, request, tmp_path
):
    url = fresh_db(request.getfixturevalue(server))
    until = datetime.now(UTC).replace(microsecond=0)
    seed(url, 150, days=2, layout="design", world=World(seed=8), end=until.replace(tzinfo=None))
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        for text, _ in PAYLOADS:
            cur.execute(
                'INSERT INTO bot_training_data ("botId", "dataType", input, "actualOutput",'
                " reward, \"createdAt\") VALUES ('trading_advanced', 'market_data', %s,"
                ' \'{"action": "hold"}\', 0.1, %s) RETURNING id',
                (text, until - timedelta(minutes=5)),
            )
        cur.execute("SELECT id::text, input FROM bot_training_data")
        stored = dict(cur.fetchall())
    conn.close()
    snap = export_snapshot(url, ExportSpec(until=until, days=3, min_rows=0), tmp_path)
    m = Manifest.read(snap)
    df = pq.read_table(snap / "data.parquet").to_pandas().set_index("id")
    aside = pq.read_table(snap / "quarantine.parquet").to_pandas()

    assert set(df.index) == set(stored) and m.rows == len(stored)  # nothing dropped
    by_text = {t: ok for t, ok in PAYLOADS}
    reasons = dict(zip(aside["id"], aside["reason"], strict=True))
    for row_id, text in stored.items():
        must_export = by_text.get(text, True)
        if df.loc[row_id, "input_ok"]:  # exported: the same JSON value, canonical
            assert must_export is not False, text[:80]
            assert json.loads(df.loc[row_id, "input"]) == json.loads(text)
            assert row_id not in reasons
        else:  # set aside with its reason, its row kept and flagged
            assert must_export is not True and row_id in reasons, text[:80]
    ids = {text: i for i, text in stored.items()}
    assert reasons.get(ids[PAYLOADS[4][0]], "a number outside the float range") == (
        "a number outside the float range"
    )
    assert reasons[ids[PAYLOADS[5][0]]].startswith("not JSON")
    assert reasons[ids[PAYLOADS[6][0]]] == "JSON list, not an object"
    assert reasons[ids["NA"]].startswith("not JSON")
    assert m.quarantined == {
        "input: JSON list, not an object": 1,
        "input: not JSON": 2,
    } | ({"input: a number outside the float range": 1} if len(reasons) == 4 else {})
    assert m.bad_input_rows == len(reasons) and len(aside) == len(reasons)
    # validation judges the share with its existing limit
    result = validate_snapshot(snap, ValidationSpec(max_bad_payload_fraction=0.01), min_rows=0)
    assert not result.success
    assert any(f.column == "input_ok" for f in result.failures)
    # and training takes the snapshot as it is (what was exported, NUL, -0, deep, 1 MB,
    # and on PostgreSQL 16 the integer beyond float range too)
    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "model.train", "--snapshot", str(snap), "--out", str(out)]
    r = subprocess.run(
        [*cmd, "--max-epochs", "1", "--no-progress"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "result.json").read_text())["metrics"]["train_rows"] > 0
