"""Served decisions joined with their rewards, for the snapshot.

A decision (core.decisions) is trained on once its reward wait has passed, with the
reward recorded within the wait: by `POST /reward`, or by a row the bots wrote to
their own table naming the decision (`decision_id` in its output). Either counts,
never both: the API's reward first, else the bot row's (the first one written), and
a bot row that names a logged decision is never also a row of its own. A decision
still inside its wait is counted as waiting and left for a later run; one without a
reward after it is counted and left out, or given `missing_reward`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa

from model.features import canonical_json
from model.snapshot import DATA_TYPES, SCHEMA


@dataclass
class BotRewards:
    """Rewards the bots wrote to their own table for logged decisions (first one wins)."""

    known: set[str]  # the logged decisions' ids
    found: dict[str, tuple[float | None, datetime]] = field(default_factory=dict)
    rows: int = 0  # bot rows that named a logged decision (not rows of their own)

    def take(self, table: pa.Table) -> pa.Table:
        """`table` (bot rows, SCHEMA) without the rows that name a logged decision; their
        rewards are kept for the join."""
        if not self.known or table.num_rows == 0:
            return table
        import orjson
        import pyarrow.compute as pc

        maybe = pc.fill_null(pc.match_substring(table["action"], '"decision_id"'), False)
        if not pc.any(maybe).as_py():
            return table
        keep = []
        actions = table["action"].to_pylist()
        rewards, times = table["reward"].to_pylist(), table["created_at"].to_pylist()
        for i, hit in enumerate(maybe.to_pylist()):
            ref = _decision_id(orjson, actions[i]) if hit else None
            if ref in self.known:
                self.rows += 1
                self.found.setdefault(ref, (rewards[i], times[i]))
                keep.append(False)
            else:
                keep.append(True)
        return table.filter(pa.array(keep))


def _decision_id(orjson, text: str | None):
    try:
        doc = orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        return None
    ref = doc.get("decision_id") if isinstance(doc, dict) else None
    return ref if isinstance(ref, str) else None


def join(
    decided: list[dict],
    bots: BotRewards,
    until: datetime,
    wait_s: float,
    missing_reward: float | None,
) -> tuple[pa.Table, dict]:
    """The decisions to train on, as snapshot rows (SCHEMA), and the counts."""
    wait = timedelta(seconds=wait_s)
    counts = dict.fromkeys(
        ("logged", "joined", "waiting", "without_reward", "late_rewards", "from_api"), 0
    )
    counts |= {"from_bot_rows": 0, "default_reward": missing_reward, "reward_wait_s": wait_s}
    rows = []
    for d in decided:
        counts["logged"] += 1
        made = _utc(d["created_at"])
        if made >= until - wait:
            counts["waiting"] += 1
            continue
        reward, source, late = _reward(d, bots.found.get(d["id"]), made + wait)
        counts["late_rewards"] += late
        if reward is None:
            counts["without_reward"] += 1
            if missing_reward is None:
                continue
            reward, source = missing_reward, "default"
        else:
            counts["joined"] += 1
            counts["from_api" if source == "api" else "from_bot_rows"] += 1
        rows.append(_row(d, made, reward, source))
    return pa.Table.from_pylist(rows, schema=SCHEMA), counts


def _reward(d: dict, bot: tuple | None, deadline: datetime) -> tuple[float | None, str, bool]:
    """(reward within the wait or None, its source, whether a reward came too late)."""
    late = False
    if d["reward"] is not None:
        if _utc(d["reward_at"]) <= deadline:
            return float(d["reward"]), "api", False
        late = True
    if bot is not None and bot[0] is not None:
        if _utc(bot[1]) <= deadline:
            return float(bot[0]), "bot row", late
        late = True
    return None, "", late


def _row(d: dict, made: datetime, reward: float, source: str) -> dict:
    record = {
        "id": d["id"],
        "model_version": d["model_version"],
        "probability": d["probability"],
        "candidates": json.loads(d["candidates"]) if d["candidates"] else None,
        "exploration": json.loads(d["exploration"]),
        "reward_source": source,
    }
    return {
        "id": d["id"],
        "bot_id": d["bot"],
        "bot": d["bot"],
        "data_type": d["data_type"] or DATA_TYPES[0],
        "input": canonical_json(json.loads(d["input"])),
        "input_ok": True,
        "action": canonical_json(json.loads(d["action"])),
        "action_ok": True,
        "reward": reward,
        "created_at": made,
        "propensity": float(d["probability"]),
        "decision": canonical_json(record),
    }


def _utc(t: datetime) -> datetime:
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
