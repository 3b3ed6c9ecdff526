"""The execute answer: what the served policy decides for one request, built in one place.

Both servers the product offers give it: the agent server's `/predict` and the MLflow
pyfunc (`mlflow models serve`) are thin adapters over `decide`. A request becomes the
document the bots log, `{"task": task, **context}` (without `candidates`), for the
bot `agent`; `context.data_type` names its kind of data (else the bot's usual one);
`context.candidates`, when given, are the actions to rank instead of the bot's bank.

An answer is a decision. The model ranks the candidates by the lower bound of their
reward; the exploration (`Exploration`, explicit and configurable) gives every
candidate a probability, at least `min_probability`; the action is drawn with those
probabilities by a number derived from the decision id alone. So a retry with the
same id gets the same answer from the same model, and the logged probabilities can be
recomputed from the logged lower bounds and settings (`Exploration.probabilities`)
and the choice from the id (`draw`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np

from model.artifact import AgentModel, Ranked
from model.config import Exploration
from model.snapshot import DATA_TYPES

RUNNERS_UP = 5  # ranked candidates shown after the chosen one
DIGITS = 6  # scores are rounded to this many decimals in the answer


def draw(decision_id: str, probabilities) -> int:
    """The candidate a decision takes: the first whose cumulative probability exceeds a
    uniform number made from the decision id (the same id, the same choice)."""
    digest = hashlib.sha256(decision_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    cumulative = np.cumsum(np.asarray(probabilities, float))
    return int(
        min(np.searchsorted(cumulative, u * cumulative[-1], side="right"), len(cumulative) - 1)
    )


@dataclass(frozen=True)
class Query:
    """One execute request as the model reads it."""

    agent: str
    document: dict  # what the bots log as input: the task beside the context
    candidates: list[dict] | None  # None: the bot's bank
    data_type: str | None  # None: the bot's usual kind of data
    decision_id: str = ""  # empty: a new one is made

    @classmethod
    def of(cls, agent: str, task: str, context: dict, decision_id: str | None = None) -> Query:
        dt = context.get("data_type")
        return cls(
            agent=agent,
            document={"task": task, **{k: v for k, v in context.items() if k != "candidates"}},
            candidates=context.get("candidates") or None,
            data_type=dt if isinstance(dt, str) else None,
            decision_id=decision_id or str(uuid.uuid4()),
        )


@dataclass
class Decision:
    """An execute answer and the record the decision log keeps of it."""

    answer: dict
    record: dict


class UnknownAgent(ValueError):
    """The model has no actions for this agent and the request named none."""


def decide(
    model: AgentModel,
    queries: list[Query],
    exploration: Exploration | None = None,
    version: str | None = None,
) -> list[Decision]:
    """The decision of each query: all candidates of all queries ranked in one batched
    forward pass, then each drawn under `exploration` (default: `Exploration()`).
    UnknownAgent when a query names no candidates for an agent the model does not know."""
    exploration = exploration or Exploration()
    for q in queries:
        if not _rankable(model, q):
            raise UnknownAgent(f"unknown agent {q.agent!r}; known: {', '.join(model.bots)}")
    ranked = model.rank_many(
        [(q.agent, q.document, q.candidates) for q in queries], [q.data_type for q in queries]
    )
    data_types = [
        q.data_type or model.default_data_type.get(q.agent) or DATA_TYPES[0] for q in queries
    ]
    return [
        _decision(q, r, exploration, version, dt)
        for q, r, dt in zip(queries, ranked, data_types, strict=True)
    ]


def _rankable(model: AgentModel, q: Query) -> bool:
    """Whether `model` can rank `q`'s candidates: given in the request, or its bot's bank."""
    return bool(q.candidates) or model.knows(q.agent)


def _decision(q: Query, ranked: list[Ranked], ex: Exploration, version, data_type) -> Decision:
    probs = ex.probabilities([r.lower for r in ranked])
    k = draw(q.decision_id, probs)
    chosen, rest = ranked[k], [r for i, r in enumerate(ranked) if i != k]
    answer = {
        "type": "execution",
        "agent": q.agent,
        "status": "completed",
        "decision_id": q.decision_id,
        "probability": round(float(probs[k]), DIGITS),
        "explored": k != 0,
        "result": {
            **_scored(chosen),
            "runners_up": [_scored(r) for r in rest[:RUNNERS_UP]],
            "candidates": "context" if q.candidates else "action bank",
        },
        "answer": _sentence(q.agent, chosen, rest, k != 0),
    }
    record = {
        "id": q.decision_id,
        "created_at": datetime.now(UTC).isoformat(),
        "bot": q.agent,
        "data_type": data_type,
        "input": q.document,
        "candidates": q.candidates,
        "action": chosen.action,
        "probability": float(probs[k]),
        "explored": k != 0,
        # unrounded: the probabilities are recomputed from these
        "ranking": ranking_record(ranked, probs),
        "model_version": version,
        "exploration": asdict(ex),
    }
    return Decision(answer, record)


def ranking_record(ranked: list[Ranked], probs) -> list[dict]:
    """A ranking as the logs keep it: each candidate's action, expected reward, lower
    bound and probability, unrounded."""
    return [
        {
            "action": r.action,
            "expected_reward": r.score,
            "lower_bound": r.lower,
            "probability": float(p),
        }
        for r, p in zip(ranked, probs, strict=True)
    ]


def _sentence(agent: str, chosen: Ranked, rest: list[Ranked], explored: bool) -> str:
    verb = "tries" if explored else "recommends"
    text = f"{agent} {verb} {describe(chosen.action)} (expected reward {chosen.score:+.3f}"
    if rest:
        text += f"; next {describe(rest[0].action)} at {rest[0].score:+.3f}"
    return text + ")"


def _scored(r: Ranked) -> dict:
    return {
        "action": r.action,
        "expected_reward": round(r.score, DIGITS),
        "lower_bound": round(r.lower, DIGITS),
    }


def describe(action: dict) -> str:
    """An action in words: its name, then its parameters."""
    name = action.get("action", json.dumps(action, sort_keys=True))
    extra = ", ".join(f"{k} {v}" for k, v in sorted(action.items()) if k != "action")
    return f"{name} ({extra})" if extra else str(name)


def replay(record: dict) -> tuple[list[float], int]:
    """From a logged decision record: the probabilities its logged lower bounds and
    exploration settings give, and the index its id draws (what was served)."""
    probs = Exploration(**record["exploration"]).probabilities(
        [r["lower_bound"] for r in record["ranking"]]
    )
    return [float(p) for p in probs], draw(record["id"], probs)


def shadow_record(q: Query, served: Decision, version: str, outcome: str, **fields) -> dict:
    """One row of the Challenger's view (`agent_shadow`) of a decision Production made."""
    return {
        "decision_id": q.decision_id,
        "challenger_version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "bot": q.agent,
        "production_version": served.record["model_version"],
        "outcome": outcome,
        "decisions": 1,
        **fields,
    }


def skipped_record(version: str, bot: str, production: str | None, reason: str, n: int) -> dict:
    """One row (`agent_shadow`) for `n` decisions of `bot` the shadow skipped for `reason`."""
    return {
        "decision_id": f"skipped:{uuid.uuid4().hex}",
        "challenger_version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "bot": bot,
        "production_version": production,
        "outcome": "skipped",
        "reason": reason,
        "decisions": n,
    }


def shadow(
    model: AgentModel,
    queries: list[Query],
    served: list[Decision],
    exploration: Exploration | None = None,
    version: str | None = None,
) -> list[dict]:
    """The Challenger `model`'s view of decisions already made (`served`, Production's):
    each query's candidates ranked in one batched pass and given probabilities under the
    same exploration; the action its decision id would draw, its first-ranked action,
    whether that is Production's first, and the probability it gives the action
    Production served (0 when it would never choose it). A query for an agent the
    Challenger does not know is an `error` record of its own; the rest are `scored`."""
    exploration = exploration or Exploration()
    known = [_rankable(model, q) for q in queries]
    taken = [q for q, k in zip(queries, known, strict=True) if k]
    ranked = iter(
        model.rank_many(
            [(q.agent, q.document, q.candidates) for q in taken], [q.data_type for q in taken]
        )
        if taken
        else []
    )
    out = []
    for q, d, k in zip(queries, served, known, strict=True):
        if not k:
            reason = f"unknown agent {q.agent!r} for the Challenger"
            out.append(shadow_record(q, d, version, "error", reason=reason))
        else:
            out.append(_scored_view(q, d, version, next(ranked), exploration))
    return out


def _scored_view(q: Query, d: Decision, version, ranking: list[Ranked], ex: Exploration) -> dict:
    from model.features import canonical_json

    probs = ex.probabilities([r.lower for r in ranking])
    keys = [canonical_json(r.action) for r in ranking]
    logged = canonical_json(d.record["action"])
    first = canonical_json(d.record["ranking"][0]["action"])
    return shadow_record(
        q,
        d,
        version,
        "scored",
        action=ranking[draw(q.decision_id, probs)].action,
        first=ranking[0].action,
        agrees=keys[0] == first,
        logged_probability=float(probs[keys.index(logged)]) if logged in keys else 0.0,
        ranking=ranking_record(ranking, probs),
    )
