"""Export `bot_training_data` into a Parquet snapshot with a manifest.

psycopg reads the table's layout from the catalog and builds the query; the rows
then stream out of PostgreSQL through ADBC's driver (a binary COPY decoded into
Arrow batches) inside a read-only repeatable-read transaction, and are appended
to a Parquet file batch by batch, so memory stays flat as the row count grows.
The snapshot folder is written under a temporary name and renamed only when
complete: a failed export leaves nothing behind. The folder's format is
`model.snapshot`'s; a payload that cannot be used (not JSON, not an object, a number
outside float range, over the size limit, NULL) is listed in its quarantine with the
reason, and its row stays in the data, flagged, for validation to judge the share.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import adbc_driver_postgresql as adbc_pg
import adbc_driver_postgresql.dbapi as adbc
import orjson
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import decisions
from core.settings import ExportSpec
from flows.rewards import BotRewards, join
from flows.source import (
    detect,
    export_query,
    identity,
    parsed_by_server,
    source_id,
    window_count_query,
)
from model import snapshot
from model.snapshot import DATA, QUARANTINE, QUARANTINE_SCHEMA, SCHEMA, Manifest

# what the export query returns: the bots' rows, created_at in UTC without a zone
WIRE = pa.schema(
    [
        f if f.name != "created_at" else pa.field(f.name, pa.timestamp("us"))
        for f in SCHEMA
        if f.name not in snapshot.DECISION_COLUMNS
    ]
)


class InsufficientData(RuntimeError):
    """Fewer rows than the minimum: the run is skipped, not failed."""


def read_payload(text: str | None, max_bytes: int) -> tuple[str | None, bool, str | None]:
    """(canonical JSON, or the text as is; is a JSON object; why it cannot be used)."""
    if text is None:
        return None, False, "NULL"
    if len(text) > max_bytes // 4 and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        return text, False, f"over {max_bytes} bytes"
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "infinity" in str(exc):
            return text, False, "a number outside the float range"
        return text, False, f"not JSON: {exc}"[:300]
    out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    if not isinstance(value, dict):
        return out, False, f"JSON {type(value).__name__}, not an object"
    return out, True, None


def _false_count(col: pa.ChunkedArray) -> int:
    """Rows where a boolean column is false or null (the sum counts the trues only)."""
    return len(col) - (pc.sum(col).as_py() or 0)


class _ChunkWriter:
    """Receives the COPY stream; parses and writes it to Parquet chunk by chunk."""

    def __init__(
        self, folder: Path, canonicalize: dict[str, bool], max_payload: int, bots: BotRewards
    ):
        self.canonicalize = canonicalize  # payload column -> parse it here
        self.bot_rewards = bots  # bot rows naming a logged decision go here, not to the data
        self.max_payload = max_payload
        # rows whose payload cannot be used (id, column, reason), chunk by chunk
        self.quarantine = pq.ParquetWriter(folder / QUARANTINE, QUARANTINE_SCHEMA)
        self.reasons: dict[str, int] = {}
        self.writer = pq.ParquetWriter(
            folder / DATA,
            SCHEMA,
            compression="zstd",
            # dictionaries and min/max statistics only where they pay: unique ids and
            # long payloads cost time and gain nothing
            use_dictionary=["bot_id", "bot", "data_type"],
            write_statistics=["bot", "data_type", "reward", "created_at"],
        )
        self.stats = {
            "streamed": 0,  # the bots' rows read from the table
            "rows": 0,
            "null_reward": 0,
            "bad_input": 0,
            "bad_action": 0,
            "null_bot": 0,
            "null_data_type": 0,
            "trainable": 0,
        }
        self.bots: dict[str, int] = {}
        self.data_types: dict[str, int] = {}
        self.newest = self.oldest = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
        self.inflight: Future | None = None

    def feed(self, batch: pa.RecordBatch) -> None:
        """Hand one batch to the writer thread; at most one batch waits there.

        Arrow reads the rows and compresses without the GIL, so writing overlaps
        reading.
        """
        if self.inflight is not None:
            self.inflight.result()  # bounded memory: one batch converting, one reading
        self.inflight = self.pool.submit(self._write_batch, batch)

    def _write_batch(self, batch: pa.RecordBatch) -> None:
        # the query's own column names and types, without the driver's field metadata
        table = pa.Table.from_batches([batch]).cast(WIRE)
        table = table.set_column(
            9, "created_at", table["created_at"].cast(pa.timestamp("us", tz="UTC"))
        )
        for col in ("input", "action"):
            table = self._read_payloads(table, col)
        self.stats["streamed"] += table.num_rows
        table = self.bot_rewards.take(table)
        for col in snapshot.DECISION_COLUMNS:  # the bots' rows are no served decisions
            table = table.append_column(
                SCHEMA.field(col), pa.nulls(table.num_rows, SCHEMA.field(col).type)
            )
        self.write(table)

    def write(self, table: pa.Table) -> None:
        """Count and write rows in SCHEMA (the bots' own, or joined decisions)."""
        self._count(table)
        self.writer.write_table(table)

    def _read_payloads(self, table: pa.Table, col: str) -> pa.Table:
        """Canonical JSON for the rows the server did not parse (all of them when it
        parses none); each row that still cannot be used is listed with its reason."""
        i = SCHEMA.get_field_index(col)
        if self.canonicalize[col]:
            mask = None
            texts = table[col].to_pylist()
            ids = table["id"].to_pylist()
        else:
            ok = table[i + 1]
            if ok.null_count == 0 and pc.all(ok).as_py():
                return table  # the server read every one: nothing to convert
            mask = pc.invert(pc.fill_null(ok, False)).combine_chunks()
            rows = pc.indices_nonzero(mask)
            if len(rows) == 0:
                return table  # the server read every one: nothing to convert
            texts = table[col].take(rows).to_pylist()
            ids = table["id"].take(rows).to_pylist()
        read = [read_payload(text, self.max_payload) for text in texts]
        aside = [
            {"id": row_id, "column": col, "reason": why}
            for row_id, (_, _, why) in zip(ids, read, strict=True)
            if why is not None
        ]
        for a in aside:
            kind = f"{col}: {a['reason'].split(':')[0]}"
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if aside:
            self.quarantine.write_table(pa.Table.from_pylist(aside, schema=QUARANTINE_SCHEMA))
        new_texts = pa.array([r[0] for r in read], pa.string())
        new_oks = pa.array([r[1] for r in read], pa.bool_())
        if mask is not None:  # only the rows the server left: put them back in place
            new_texts = pc.replace_with_mask(table[col].combine_chunks(), mask, new_texts)
            new_oks = pc.replace_with_mask(table[i + 1].combine_chunks(), mask, new_oks)
        table = table.set_column(i, col, new_texts)
        return table.set_column(i + 1, SCHEMA.names[i + 1], new_oks)

    def _count(self, t: pa.Table) -> None:
        s = self.stats
        s["rows"] += t.num_rows
        s["null_reward"] += t["reward"].null_count
        s["bad_input"] += _false_count(t["input_ok"])
        s["bad_action"] += _false_count(t["action_ok"])
        usable = pc.and_(pc.is_valid(t["reward"]), pc.and_(t["input_ok"], t["action_ok"]))
        s["trainable"] += pc.sum(usable).as_py() or 0  # (null counts as not)
        for key, counts in (("bot", self.bots), ("data_type", self.data_types)):
            s[f"null_{key}"] += t[key].null_count
            for v in pc.value_counts(t[key].drop_null()).to_pylist():
                counts[v["values"]] = counts.get(v["values"], 0) + v["counts"]
        if t.num_rows:
            lo, hi = pc.min_max(t["created_at"]).values()
            self.newest = max(filter(None, [self.newest, hi.as_py()]))
            self.oldest = min(filter(None, [self.oldest, lo.as_py()]))

    def drain(self) -> None:
        """Wait until the writer thread has written every batch fed so far."""
        if self.inflight is not None:
            self.inflight.result()
            self.inflight = None

    def close(self) -> None:
        """Wait for the writer thread and close the file; re-raises a failed chunk."""
        try:
            if self.inflight is not None:
                self.inflight.result()
        finally:
            self.inflight = None
            self.pool.shutdown()
            for writer in (self.writer, self.quarantine):
                if writer.is_open:
                    writer.close()


def export_snapshot(url: str, spec: ExportSpec, out_root: Path) -> Path:
    """Export one snapshot under `out_root`; returns its folder.

    Raises InsufficientData (and leaves no snapshot) when fewer than
    `spec.min_rows` trainable rows (scored, payloads readable) fall in the window.
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-snapshot-", dir=out_root))
    try:
        manifest = _export_into(url, spec, tmp)
        if manifest.trainable_rows < spec.min_rows:
            raise InsufficientData(
                f"insufficient data: {manifest.trainable_rows} trainable rows (scored, with "
                f"readable payloads) of {manifest.rows} exported < {spec.min_rows}"
            )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{manifest.sha256[:12]}"
        for n in range(1, 1000):
            final = out_root / (name if n == 1 else f"{name}-{n}")
            try:  # atomic on one filesystem: the snapshot appears whole
                os.rename(tmp, final)
                return final
            except OSError:  # the same rows exported twice in one second: another name
                if not final.exists():
                    raise
        raise FileExistsError(f"no free snapshot name for {name} in {out_root}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_into(url: str, spec: ExportSpec, folder: Path) -> Manifest:
    since, until = spec.window()
    with psycopg.connect(url) as conn, psycopg.ClientCursor(conn) as cur:
        # the table's layout (from the catalog), and the zone naive timestamps are in
        cur.execute("SHOW TimeZone")
        naive_tz = spec.naive_timezone or cur.fetchone()[0]
        src = detect(cur, spec.table, spec.columns)
        source = identity(cur, src)
        version = conn.info.server_version
        params = {"since": since, "until": until, "naive_tz": naive_tz, "limit": spec.limit}
        query = export_query(src, version).as_string(conn)
        count_sql = cur.mogrify(window_count_query(src), params)
        rows_sql = cur.mogrify(query, params)  # values quoted by psycopg
        conn.rollback()
        decided = decisions.window(conn, since, until)  # served decisions, if any are logged
    bots = BotRewards({d["id"] for d in decided})
    sink = _ChunkWriter(
        folder,
        {
            "input": not parsed_by_server(src, "input", version),
            "action": not parsed_by_server(src, "output", version),
        },
        spec.max_payload_bytes,
        bots,
    )
    try:
        window_rows = _read_rows(url, count_sql, rows_sql, spec.chunk_bytes, sink.feed)
        sink.drain()
        joined, counts = join(decided, bots, until, spec.reward_wait_s, spec.missing_reward)
        sink.write(joined)
    finally:
        sink.close()
    sha256 = snapshot.sha256(folder)
    manifest = _manifest(src, spec, query, sink, since, until, window_rows, naive_tz, sha256)
    manifest.source, manifest.source_id = source, source_id(source)
    manifest.decisions = counts | {"bot_rows_naming_them": bots.rows}
    manifest.write(folder)
    return manifest


def _read_rows(url: str, count_sql: str, rows_sql: str, batch_bytes: int, feed) -> int:
    """Count the window and stream its rows, in one read-only snapshot; returns the count.

    The rows come through ADBC's PostgreSQL driver: a binary COPY decoded straight
    into Arrow batches of about `batch_bytes`. Binary values need no NULL marker and
    no date style: what PostgreSQL holds is what arrives.
    """
    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        for statement in (
            # the count and the rows from one snapshot of the table
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            # how the server reads the window's times, whatever its own settings
            "SET TIME ZONE 'UTC'",
            "SET client_encoding TO 'UTF8'",
        ):
            cur.execute(statement)
        cur.execute(count_sql)
        window_rows = cur.fetchone()[0]
        cur.adbc_statement.set_options(
            **{adbc_pg.StatementOptions.BATCH_SIZE_HINT_BYTES.value: str(batch_bytes)}
        )
        cur.execute(rows_sql)
        for batch in cur.fetch_record_batch():
            feed(batch)
        cur.execute("ROLLBACK")  # read-only: nothing to keep
    return window_rows


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _manifest(src, spec, query, sink, since, until, window_rows, naive_tz, sha256) -> Manifest:
    s = sink.stats
    return Manifest(
        format_version=snapshot.FORMAT_VERSION,
        rows=s["rows"],
        null_reward_rows=s["null_reward"],
        bad_input_rows=s["bad_input"],
        bad_action_rows=s["bad_action"],
        window={"since": since.isoformat(), "until": until.isoformat()},
        watermark=_iso(sink.newest),
        oldest=_iso(sink.oldest),
        layout=src.layout,
        table=src.table,
        columns=src.columns,
        query=query,
        limit=spec.limit,
        sha256=sha256,
        bots=dict(sorted(sink.bots.items())),
        data_types=dict(sorted(sink.data_types.items())),
        exported_at=datetime.now(UTC).isoformat(),
        quarantined=dict(sorted(sink.reasons.items())),
        trainable_rows=s["trainable"],
        null_bot_rows=s["null_bot"],
        null_data_type_rows=s["null_data_type"],
        window_rows=window_rows,
        limit_cut=window_rows > s["streamed"],
        naive_timezone=None if src.created_tz else naive_tz,
    )
