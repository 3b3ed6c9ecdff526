"""The execute answer: what the served policy decides for one request, built in one place.

Both servers the product offers give it: the agent server's `/predict` and the MLflow
pyfunc (`mlflow models serve`) are thin adapters over `decide`. A request becomes the
document the bots log, `{"task": task, **context}` (without `candidates`), for the
bot `agent`; `context.data_type` names its kind of data (else the bot's usual one);
`context.candidates`, when given, are the actions to rank instead of the bot's bank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from model.artifact import AgentModel, Ranked

RUNNERS_UP = 5  # ranked candidates shown after the chosen one
DIGITS = 6  # scores are rounded to this many decimals in the answer


@dataclass(frozen=True)
class Query:
    """One execute request as the model reads it."""

    agent: str
    document: dict  # what the bots log as input: the task beside the context
    candidates: list[dict] | None  # None: the bot's bank
    data_type: str | None  # None: the bot's usual kind of data

    @classmethod
    def of(cls, agent: str, task: str, context: dict) -> Query:
        dt = context.get("data_type")
        return cls(
            agent=agent,
            document={"task": task, **{k: v for k, v in context.items() if k != "candidates"}},
            candidates=context.get("candidates") or None,
            data_type=dt if isinstance(dt, str) else None,
        )


class UnknownAgent(ValueError):
    """The model has no actions for this agent and the request named none."""


def decide(model: AgentModel, queries: list[Query]) -> list[dict]:
    """The execute answer of each query: all candidates of all queries ranked in one
    batched forward pass."""
    ranked = model.rank_many(
        [(q.agent, q.document, q.candidates) for q in queries], [q.data_type for q in queries]
    )
    return [answer(q, r) for q, r in zip(queries, ranked, strict=True)]


def answer(query: Query, ranked: list[Ranked]) -> dict:
    """`type`, `agent`, `status`, `result` (the chosen action, its expected reward and
    lower bound, the runners-up, where the candidates came from) and `answer`, a
    sentence."""
    if not ranked:
        raise UnknownAgent(f"unknown agent {query.agent!r}: the model has no actions for it")
    best, rest = ranked[0], ranked[1 : 1 + RUNNERS_UP]
    sentence = (
        f"{query.agent} recommends {describe(best.action)} (expected reward {best.score:+.3f}"
    )
    if rest:
        sentence += f"; next best {describe(rest[0].action)} at {rest[0].score:+.3f}"
    return {
        "type": "execution",
        "agent": query.agent,
        "status": "completed",
        "result": {
            **_scored(best),
            "runners_up": [_scored(r) for r in rest],
            "candidates": "context" if query.candidates else "action bank",
        },
        "answer": sentence + ")",
    }


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
