"""POST /reward in the HTTP process: a decision's reward, recorded once.

The reward goes on the decision's row in `agent_decisions` (core.decisions): an
unknown decision id is a 404, a value outside the rewards' bounds (the validation's
`reward_min`/`reward_max`) a 422, another reward for a decision that has one a 409
(the first stands), and the same reward again (a retry) a 200 that says it was
already recorded. While the database is unreachable the answer is a 503 to retry.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from fastapi.responses import JSONResponse

from core import decisions
from core.settings import Settings
from serving.requests import RewardRequest

log = logging.getLogger("valifi.serving.rewards")


def _error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"type": "error", "error": message, "answer": message},
        headers=headers or None,
    )


class Rewards:
    """One database connection per HTTP process, used by one request at a time."""

    def __init__(self, settings: Settings):
        self.url = settings.database_url
        self.bounds = (settings.validation.reward_min, settings.validation.reward_max)
        self._conn = None
        self._lock = threading.Lock()

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = decisions.connect(self.url)
        return self._conn

    def record(self, req: RewardRequest):
        """The answer to one POST /reward (a sync endpoint: FastAPI runs it in a thread)."""
        lo, hi = self.bounds
        if not lo <= req.reward <= hi:
            return _error(422, f"reward {req.reward:g} is outside the bounds [{lo:g}, {hi:g}]")
        if self.url is None:
            return _error(503, "decisions are not logged: the server has no database")
        at = req.at or datetime.now(UTC)
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        import psycopg

        with self._lock:
            try:
                got = decisions.record_reward(
                    self._connection(), req.decision_id, req.reward, at, "api"
                )
            except decisions.UnknownDecision:
                return _error(404, f"no decision {req.decision_id!r} is logged")
            except decisions.RewardConflict as exc:
                return _error(409, str(exc))
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                log.warning("reward not recorded, the database is unreachable: %s", exc)
                return _error(
                    503, "the decision log's database is unreachable: retry", **{"Retry-After": "5"}
                )
        return {
            "type": "reward",
            "decision_id": req.decision_id,
            "reward": got.reward,
            "recorded_at": got.at.isoformat(),
            "status": "recorded" if got.new else "already recorded",
            "answer": f"reward {got.reward:g} {'recorded' if got.new else 'was already recorded'} "
            f"for decision {req.decision_id}",
        }
