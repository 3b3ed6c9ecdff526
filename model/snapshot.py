"""The snapshot: the folder of rows one training reads, and the one owner of its format.

    SNAPSHOT/
      data.parquet        SCHEMA: id, bot_id, bot, data_type, input, input_ok, action,
                          action_ok, reward, created_at (UTC), newest first; and for a
                          served decision its propensity and its log record (decision)
      quarantine.parquet  QUARANTINE_SCHEMA: id, column, reason: each payload that
                          cannot be used; its row stays in data.parquet, flagged
      manifest.json       Manifest: counts, window and what it held, watermark, layout,
                          query, sha256 of data.parquet, the source it came from, and
                          the served decisions joined, waiting and without a reward
      validation/         Data Docs, written by validation
      validation.json     validation's summary
      acceptance.json     an operator's acceptance of a new mix of bots, if any

The export writes it (flows/export.py), validation judges it, training reads the
trainable rows with `read_rows` and splits them by time with `temporal_split`, and
the registry logs its manifest. Everything here is pure: files in, frames out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

DATA = "data.parquet"
QUARANTINE = "quarantine.parquet"
MANIFEST = "manifest.json"
DOCS = "validation"
VALIDATION = "validation.json"
ACCEPTANCE = "acceptance.json"
FORMAT_VERSION = 2  # 2: served decisions, with their propensity
DECISION_COLUMNS = ("propensity", "decision")  # missing in format 1: null

# The kinds of data the bots log (`data_type`); the first is a bot's default.
DATA_TYPES = ("market_data", "user_feedback", "strategy_result")


@cache
def _schemas() -> dict[str, pa.Schema]:
    import pyarrow as pa

    return {
        "SCHEMA": pa.schema(
            [
                ("id", pa.string()),
                ("bot_id", pa.string()),
                ("bot", pa.string()),
                ("data_type", pa.string()),
                ("input", pa.string()),
                ("input_ok", pa.bool_()),
                ("action", pa.string()),
                ("action_ok", pa.bool_()),
                ("reward", pa.float64()),
                ("created_at", pa.timestamp("us", tz="UTC")),
                # a served decision's: the probability it was chosen with, and the
                # rest of its log record (model version, candidates, exploration) as
                # JSON; null on the bots' own rows
                ("propensity", pa.float64()),
                ("decision", pa.string()),
            ]
        ),
        "QUARANTINE_SCHEMA": pa.schema(
            [("id", pa.string()), ("column", pa.string()), ("reason", pa.string())]
        ),
    }


def __getattr__(name: str):
    """SCHEMA and QUARANTINE_SCHEMA, the Arrow schemas of the data and the quarantine,
    built on first use: what reads only the manifest or DATA_TYPES (the settings, the
    command) loads no pyarrow."""
    if name in ("SCHEMA", "QUARANTINE_SCHEMA"):
        return _schemas()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Manifest:
    format_version: int
    rows: int
    null_reward_rows: int
    bad_input_rows: int  # input is not a JSON object (unparseable text, or a JSON scalar)
    bad_action_rows: int
    window: dict[str, str]
    watermark: str | None  # newest created_at exported
    oldest: str | None
    layout: str
    table: str
    columns: dict[str, str]
    query: str
    limit: int
    sha256: str  # of data.parquet
    bots: dict[str, int]
    data_types: dict[str, int]
    exported_at: str
    # the window held this many rows; `limit_cut`: the export kept only the newest `limit`
    window_rows: int | None = None
    limit_cut: bool = False
    null_bot_rows: int = 0  # rows without a bot or data type (validation fails them)
    null_data_type_rows: int = 0
    naive_timezone: str | None = None  # the zone a column without one was read in
    # payloads that cannot be used, by column and reason (each row listed in QUARANTINE)
    quarantined: dict[str, int] = field(default_factory=dict)
    trainable_rows: int = 0  # scored, input and action readable: what min_rows counts
    # where the rows came from (cluster, database, schema, table, layout, columns) and
    # its short name: validation compares shares only with snapshots of the same source
    source: dict = field(default_factory=dict)
    source_id: str | None = None
    # served decisions in the window (flows/rewards.py): joined with a reward, waiting
    # for the reward wait to pass, without a reward, rewards that came after the wait,
    # and where the joined rewards came from
    decisions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write(self, snapshot: Path) -> None:
        (Path(snapshot) / MANIFEST).write_text(self.to_json())

    @classmethod
    def read(cls, snapshot: Path) -> Manifest:
        return cls(**json.loads((Path(snapshot) / MANIFEST).read_text()))


def sha256(snapshot: Path) -> str:
    """The sha256 of a snapshot's data file (what the manifest records)."""
    with open(Path(snapshot) / DATA, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def exists(snapshot: Path) -> bool:
    return (Path(snapshot) / DATA).is_file()


def read_rows(snapshot: Path) -> pd.DataFrame:
    """Trainable rows of a snapshot, oldest first: scored, with parseable payloads, the
    input and the action parsed."""
    import pandas as pd

    df = pd.read_parquet(Path(snapshot) / DATA)
    for col in DECISION_COLUMNS:  # a snapshot of format 1 has none
        if col not in df:
            df[col] = None
    df["propensity"] = df["propensity"].astype("float64")
    ok = df["reward"].notna() & df["input_ok"].fillna(False) & df["action_ok"].fillna(False)
    df = df[ok].sort_values(["created_at", "id"], kind="mergesort").reset_index(drop=True)
    df["input"] = [json.loads(s) for s in df["input"]]
    df["action"] = [json.loads(s) for s in df["action"]]
    return df


def temporal_split(df: pd.DataFrame, val_fraction: float, holdout_fraction: float):
    """(train, val, holdout) of rows sorted oldest first: the newest rows are the holdout,
    the newest of the rest validate. Never a random split."""
    n = len(df)
    n_hold = round(n * holdout_fraction)
    n_val = round((n - n_hold) * val_fraction)
    cut_val, cut_hold = n - n_hold - n_val, n - n_hold
    return df.iloc[:cut_val], df.iloc[cut_val:cut_hold], df.iloc[cut_hold:]


def write_table(snapshot: Path, table: pa.Table) -> None:
    """A whole data file at once (the export streams its own, chunk by chunk)."""
    import pyarrow.parquet as pq

    pq.write_table(table.cast(_schemas()["SCHEMA"]), Path(snapshot) / DATA)
