"""The shadow: the Challenger scores live execute decisions without touching the answers.

Each inference worker follows the `Challenger` alias as it follows `Production` (the
same follower: verified load, shared cache; a second model in the worker's memory).
After Production has decided a batch, the shadow takes up a share of its decisions
(`shadow_share`, drawn from each decision id) and keeps them pending. The batching loop
(serving.batching) hands the worker to the shadow between batches, after the batch's
answers have left, a piece of at most STEP decisions at a time (`step`): the
Challenger ranks the same candidates in one batched pass and its view of each
decision is logged to `agent_shadow` (core.decisions) by a log of its own, off the
request's path and spooled while the database is away.

Production comes first. The shadow has the worker freely when it is idle (no request
came for a moment); otherwise it may use at most `shadow_budget` of the worker's
time. Decisions it has no time for (more than `max_pending` waiting) are counted as
`skipped`: a row per bot, Production version and reason every TALLY_S, with the
number of decisions it stands for. A Challenger that raises is logged as `error`; one
whose alias names a version this worker has not loaded (loading, or refused as a bad
artifact) as `missing`.
None of it is ever raised into a request, and the answers never depend on it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable

from model.decision import Decision, Query, shadow, shadow_record, skipped_record
from serving.decision_log import DecisionLog
from serving.follower import AliasFollower

log = logging.getLogger("valifi.serving.shadow")

OUTCOMES = ("scored", "skipped", "error", "missing")
STEP = 8  # decisions scored at a time: a request arriving meanwhile waits this long
MAX_CREDIT_S = 0.05  # time budget saved up while the worker is busy, at most
TALLY_S = 1.0  # skipped decisions are written as counts this often


def sampled(decision_id: str, share: float) -> bool:
    """Whether the shadow takes up this decision: a share of the decisions, drawn from
    the id (a different draw from the one that chose the action)."""
    if share >= 1:
        return True
    digest = hashlib.sha256(f"shadow:{decision_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


class Shadow:
    def __init__(
        self,
        follower: AliasFollower,
        log_: DecisionLog,
        exploration,
        share: float = 1.0,
        budget: float = 0.1,
        max_pending: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.follower, self.log, self.exploration = follower, log_, exploration
        self.share, self.budget, self.max_pending = share, budget, max_pending
        self.clock = clock
        # (the Challenger version that took them up, the queries, Production's decisions)
        self.pending: deque[tuple[str, list[Query], list[Decision]]] = deque()
        self.waiting = 0  # decisions pending
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.spent_s = 0.0  # time spent scoring
        self._credit = 0.0
        self._last = clock()
        # skipped decisions not written yet: (Challenger version, bot, Production's, reason)
        self._tally: dict[tuple[str, str, str | None, str], int] = {}
        self._tallied_at = clock()

    # -- after Production decided (inside predict) --
    def offer(self, queries: list[Query], made: list[Decision]) -> None:
        """Keep the sampled decisions of a batch for the shadow; never raises."""
        try:
            alias = self.follower.status.alias_version
            if alias is None or self.share <= 0 or not self.log.enabled:
                return  # no Challenger, or nowhere to log its view: nothing to score
            taken = [
                (q, d)
                for q, d in zip(queries, made, strict=True)
                if sampled(q.decision_id, self.share)
            ]
            if not taken:
                return
            served = self.follower.served
            if served is None or served.version != alias:
                self._unscored(taken, alias, "missing", self._missing_reason(alias))
                return
            for i in range(0, len(taken), STEP):  # pieces short enough to wait for
                piece = taken[i : i + STEP]
                self.pending.append((served.version, [q for q, _ in piece], [d for _, d in piece]))
            self.waiting += len(taken)
            while self.waiting > self.max_pending:  # the oldest waited too long
                version, qs, ds = self.pending.popleft()
                self.waiting -= len(qs)
                self._unscored(list(zip(qs, ds, strict=True)), version, "skipped", self._busy())
        except Exception:  # the shadow never fails a request
            log.exception("shadow: could not take up a batch")

    # -- the worker's spare time (the batching loop) --
    def has_work(self) -> bool:
        return bool(self.pending)

    def step(self, idle: bool) -> bool:
        """Score one piece of what is pending (at most STEP decisions): freely when the
        worker is idle, else only within the time budget. Whether it scored."""
        now = self.clock()
        if self._tally and now - self._tallied_at >= TALLY_S:
            self.write_tally()
        self._credit = min(MAX_CREDIT_S, self._credit + self.budget * (now - self._last))
        self._last = now
        if not self.pending or (not idle and self._credit <= 0):
            return False
        version, queries, made = self.pending.popleft()
        self.waiting -= len(queries)
        self._score(version, queries, made)
        took = self.clock() - now
        self.spent_s += took
        if not idle:
            self._credit -= took
        self._last = self.clock()
        return True

    def _score(self, version: str, queries: list[Query], made: list[Decision]) -> None:
        """Score with the Challenger that took these decisions up (its version)."""
        served = self.follower.served
        if served is None or served.version != version:
            why = f"the Challenger alias left v{version} before it could score them"
            self._unscored(list(zip(queries, made, strict=True)), version, "skipped", why)
            return
        started = self.clock()
        try:
            records = shadow(served.model, queries, made, self.exploration, served.version)
        except Exception as exc:
            log.warning("shadow: v%s raised on a batch: %s", served.version, exc)
            self._unscored(
                list(zip(queries, made, strict=True)),
                served.version,
                "error",
                f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        ms = 1000 * (self.clock() - started) / max(1, len(records))
        for r in records:
            if r["outcome"] == "scored":
                r["scoring_ms"] = ms
            self.counts[r["outcome"]] += 1
        self.log.put(records)

    # -- records of what was not scored --
    def _unscored(self, taken: list[tuple[Query, Decision]], version, outcome, reason) -> None:
        self.counts[outcome] += len(taken)
        if outcome == "skipped":  # counted: written by `write_tally`
            for q, d in taken:
                key = (version, q.agent, d.record["model_version"], reason)
                self._tally[key] = self._tally.get(key, 0) + 1
            return
        self.log.put([shadow_record(q, d, version, outcome, reason=reason) for q, d in taken])

    def write_tally(self) -> None:
        """The skipped decisions counted so far, a row per bot, Production version and
        reason, to the log."""
        tally, self._tally = self._tally, {}
        self._tallied_at = self.clock()
        self.log.put([skipped_record(*key, n) for key, n in tally.items()])

    def _missing_reason(self, alias: str) -> str:
        last = self.follower.status.last_outcome or {}
        if last.get("version") == alias and last.get("outcome") in ("failed", "retrying"):
            return f"v{alias} not loaded: {last['outcome']}: {last.get('reason')}"[:300]
        return f"v{alias} is loading"

    def _busy(self) -> str:
        return (
            f"over the time budget: while requests wait the shadow may use "
            f"{self.budget:.0%} of the worker's time"
        )

    def close(self) -> None:
        """Decisions still pending when the worker stops are logged as skipped."""
        while self.pending:
            version, queries, made = self.pending.popleft()
            taken = list(zip(queries, made, strict=True))
            self._unscored(taken, version, "skipped", "the worker stopped")
        self.waiting = 0
        self.write_tally()

    # -- reporting --
    def status(self) -> dict:
        """The shadow's part of this worker's status."""
        st, served = self.follower.status, self.follower.served
        alias = st.alias_version
        if alias is None or not self.log.enabled or self.share <= 0:
            state = "off"
        elif served is not None and served.version == alias:
            state = "scoring"
        else:
            last = st.last_outcome or {}
            state = (
                "failed"
                if last.get("version") == alias and last.get("outcome") == "failed"
                else "loading"
            )
        return {
            "state": state,
            "alias_version": alias,
            "version": served.version if served else None,
            "loaded_at": served.loaded_at if served else None,
            "last_outcome": st.last_outcome,
            "registry_reachable": st.registry_reachable,
            "share": self.share,
            "budget": self.budget,
            "pending": self.waiting,
            "spent_s": round(self.spent_s, 3),
            "log": self.log.status(),
            **self.counts,
        }
