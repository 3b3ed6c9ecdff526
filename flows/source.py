"""Where the training rows live: detect the table's layout and build the export query.

Two layouts exist in the wild (see the schema notes): the application's
(snake_case, jsonb payloads, bot ids referencing `trading_bots`) and the original
design's (quoted camelCase, text payloads, bot names inline). Columns are detected
from the catalog; an explicit mapping in settings covers other schemas. Names are
always quoted as identifiers and values always bound as parameters.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

# role -> column names tried in order
CANDIDATES: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "bot_id": ("bot_id", "botId"),
    "data_type": ("data_type", "dataType"),
    "input": ("input",),
    "output": ("actual_output", "actualOutput"),
    "reward": ("reward",),
    "created_at": ("created_at", "createdAt"),
}


class SourceError(ValueError):
    """The source table cannot be read as training data; the message says why."""


@dataclass(frozen=True)
class Source:
    table: str
    columns: dict[str, str]  # role -> column name
    types: dict[str, str]  # role -> PostgreSQL data type
    layout: str  # "app", "design" or "custom"
    bots_table: str | None = None  # table the bot id references, with a `name` column
    bots_key: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def created_tz(self) -> bool:
        return self.types["created_at"] == "timestamp with time zone"


def _table_columns(cur, table: str) -> dict[str, str]:
    cur.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    return dict(cur.fetchall())


def _bot_reference(cur, table: str, bot_col: str) -> tuple[str, str] | None:
    """(table, key column) that `bot_col` references by foreign key, if it has `name`."""
    cur.execute(
        """
        SELECT rc.relname, ra.attname
        FROM pg_constraint c
        JOIN pg_class rc ON rc.oid = c.confrelid
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        JOIN pg_attribute ra ON ra.attrelid = c.confrelid AND ra.attnum = c.confkey[1]
        WHERE c.contype = 'f' AND c.conrelid = to_regclass(quote_ident(%s))
          AND a.attname = %s AND array_length(c.conkey, 1) = 1
        """,
        (table, bot_col),
    )
    row = cur.fetchone()
    if row is None or "name" not in _table_columns(cur, row[0]):
        return None
    return row[0], row[1]


def detect(cur, table: str, mapping: dict[str, str] | None = None) -> Source:
    """Work out which columns play which role in `table`."""
    found = _table_columns(cur, table)
    if not found:
        raise SourceError(
            f"table {table!r} does not exist in the current schema (or has no columns)"
        )
    mapping = mapping or {}
    unknown = set(mapping) - set(CANDIDATES)
    if unknown:
        raise SourceError(
            f"unknown roles in the column mapping: {sorted(unknown)}; roles are {list(CANDIDATES)}"
        )
    columns = {}
    for role, names in CANDIDATES.items():
        name = mapping.get(role) or next((n for n in names if n in found), None)
        if name is None or name not in found:
            wanted = mapping.get(role) or " or ".join(names)
            raise SourceError(
                f"table {table!r} has no column for {role} ({wanted}); its columns are "
                f"{sorted(found)}; set VALIFI_EXPORT_COLUMNS to map them"
            )
        columns[role] = name
    types = {role: found[col] for role, col in columns.items()}
    if mapping:
        layout = "custom"
    elif columns["bot_id"] == "bot_id":
        layout = "app"
    else:
        layout = "design"
    ref = _bot_reference(cur, table, columns["bot_id"])
    return Source(
        table=table,
        columns=columns,
        types=types,
        layout=layout,
        bots_table=ref[0] if ref else None,
        bots_key=ref[1] if ref else None,
    )


def identity(cur, src: Source) -> dict[str, object]:
    """What identifies where a snapshot's rows came from: the PostgreSQL cluster (its
    system identifier, which every host name and replica of it shares; the server's
    address where that cannot be read), the database, the schema, the table and the
    roles of its columns. Snapshots of one source are compared only with each other."""
    cur.execute("SELECT current_database(), current_schema()")
    database, schema = cur.fetchone()
    try:
        with cur.connection.transaction():  # a savepoint: a refusal leaves the rest usable
            cur.execute("SELECT system_identifier::text FROM pg_control_system()")
            cluster = f"system {cur.fetchone()[0]}"
    except psycopg.Error:  # some managed services revoke it
        info = cur.connection.info
        cluster = f"server {info.host}:{info.port}"
    return {
        "cluster": cluster,
        "database": database,
        "schema": schema,
        "table": src.table,
        "layout": src.layout,
        "columns": dict(sorted(src.columns.items())),
    }


def source_id(source: dict[str, object]) -> str:
    """A short stable name of a source (from `identity`)."""
    text = json.dumps(source, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parsed_by_server(src: Source, role: str, server_version: int) -> bool:
    """Whether PostgreSQL canonicalises this payload column (else the exporter does)."""
    return src.types[role] in ("jsonb", "json") or server_version >= 160000


def _payload(src: Source, role: str, server_version: int) -> tuple[sql.Composable, sql.Composable]:
    """(canonical text, is a JSON object) of a payload column.

    jsonb's text form is canonical (keys ordered, whitespace normalised). json and
    text columns are cast to jsonb by the server where that cannot fail: they hold
    JSON (`json`, or text passing `IS JSON` on PostgreSQL 16+) and no \\u0000 escape,
    which jsonb cannot store. Every other row comes out as its text with the flag
    false, and the exporter reads it itself (and sets it aside if it cannot).
    """
    col = sql.SQL("t.") + sql.Identifier(src.columns[role])
    kind = src.types[role]
    if kind == "jsonb":
        return sql.SQL("{}::text").format(col), sql.SQL("jsonb_typeof({}) = 'object'").format(col)
    no_nul = sql.SQL("strpos({}::text, '\\u0000') = 0").format(col)
    if kind == "json":
        castable = no_nul
        is_object = sql.SQL("json_typeof({}) = 'object'").format(col)
    elif server_version >= 160000:
        castable = sql.SQL("{} IS JSON AND {}").format(col, no_nul)
        is_object = sql.SQL("{} IS JSON OBJECT").format(col)
    else:
        return col + sql.SQL("::text"), sql.SQL("NULL::boolean")
    return (
        sql.SQL("CASE WHEN {ok} THEN {c}::jsonb::text ELSE {c}::text END").format(
            ok=castable, c=col
        ),
        sql.SQL("({ok} AND {obj})").format(ok=castable, obj=is_object),
    )


def _in_window(src: Source, created: sql.Composable) -> sql.Composed:
    """`created` inside [since, until): both UTC instants; a column without a time zone
    is compared in its own zone (parameter naive_tz), so an index on it still serves."""
    if src.created_tz:
        return sql.SQL("{c} >= %(since)s AND {c} < %(until)s").format(c=created)
    return sql.SQL(
        "{c} >= (%(since)s::timestamptz AT TIME ZONE %(naive_tz)s) "
        "AND {c} < (%(until)s::timestamptz AT TIME ZONE %(naive_tz)s)"
    ).format(c=created)


def window_count_query(src: Source) -> sql.Composed:
    """How many rows the window holds (parameters as export_query's)."""
    created = sql.SQL("t.") + sql.Identifier(src.columns["created_at"])
    return sql.SQL("SELECT count(*) FROM {table} t WHERE {window}").format(
        table=sql.Identifier(src.table), window=_in_window(src, created)
    )


def export_query(src: Source, server_version: int) -> sql.Composed:
    """SELECT of one snapshot: rows in [since, until), newest first, at most `limit`.

    Parameters: since, until (aware UTC instants), naive_tz (the zone of a column
    without a time zone) and limit. Times come out as UTC without a zone.
    """
    c = {role: sql.SQL("t.") + sql.Identifier(col) for role, col in src.columns.items()}
    inp, inp_ok = _payload(src, "input", server_version)
    out, out_ok = _payload(src, "output", server_version)
    created = c["created_at"]
    created_utc = (
        sql.SQL("({} AT TIME ZONE 'UTC')").format(created)
        if src.created_tz
        else sql.SQL("(({} AT TIME ZONE %(naive_tz)s) AT TIME ZONE 'UTC')").format(created)
    )
    if src.bots_table:
        bot_name = sql.SQL("COALESCE(b.name::text, {}::text)").format(c["bot_id"])
        join = sql.SQL(" LEFT JOIN {} b ON b.{} = {}").format(
            sql.Identifier(src.bots_table), sql.Identifier(src.bots_key), c["bot_id"]
        )
    else:
        bot_name, join = sql.SQL("{}::text").format(c["bot_id"]), sql.SQL("")
    return sql.SQL(
        "SELECT {id}::text AS id, {bot_id}::text AS bot_id, {bot} AS bot, "
        "{data_type}::text AS data_type, {inp} AS input, {inp_ok} AS input_ok, "
        "{out} AS action, {out_ok} AS action_ok, {reward}::float8 AS reward, "
        "{created_utc} AS created_at "
        "FROM {table} t{join} "
        "WHERE {window} "
        "ORDER BY {created} DESC, {id} DESC LIMIT %(limit)s"
    ).format(
        id=c["id"],
        bot_id=c["bot_id"],
        bot=bot_name,
        data_type=c["data_type"],
        inp=inp,
        inp_ok=inp_ok,
        out=out,
        out_ok=out_ok,
        reward=c["reward"],
        created_utc=created_utc,
        table=sql.Identifier(src.table),
        join=join,
        window=_in_window(src, created),
        created=created,
    )
