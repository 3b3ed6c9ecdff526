"""Test helpers that need no service: synthetic snapshots in the exporter's format."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flows.export import SCHEMA
from model.features import canonical_json
from model.synthetic import BadRows, World


def synthetic_snapshot(
    folder: Path,
    rows: int,
    seed: int = 0,
    days: float = 7.0,
    end: datetime | None = None,
    bad: BadRows | None = None,
) -> Path:
    """A snapshot folder (data.parquet + manifest.json) straight from the generator."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    end = end or datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    df = World(seed=seed).generate(rows, days=days, end=end, bad=bad)
    df = df.iloc[::-1]  # newest first, as exported
    table = pa.table(
        {
            "id": df["id"],
            "bot_id": df["bot"],
            "bot": df["bot"],
            "data_type": df["data_type"],
            "input": [x if isinstance(x, str) else canonical_json(x) for x in df["input"]],
            "input_ok": [isinstance(x, dict) for x in df["input"]],
            "action": [canonical_json(a) for a in df["action"]],
            "action_ok": [True] * len(df),
            "reward": df["reward"],
            "created_at": pa.array(df["created_at"], pa.timestamp("us")).cast(
                pa.timestamp("us", tz="UTC")
            ),
        },
        schema=SCHEMA,
    )
    pq.write_table(table, folder / "data.parquet")
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "sha256": f"synthetic-{seed}-{rows}",
                "window": {},
                "layout": "synthetic",
            }
        )
    )
    return folder
