"""The /predict request: what a client may send, with limits that bound its cost.

Standard JSON has no NaN or Infinity, and a JSON string holds no lone surrogate;
Python's parser accepts both, so they are refused here, as are numbers outside
float range, and contexts nested too deep or with too many values. With the body
size limit (`VALIFI_SERVE_MAX_PAYLOAD_BYTES`), these bound the work one request
can cause: at most MAX_CONTEXT_LEAVES values to walk, at most MAX_CANDIDATES
actions to score, and each sequence cut to the model's length before any text is
tokenized.
"""

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CANDIDATES = 64
MAX_CONTEXT_DEPTH = 16
MAX_CONTEXT_LEAVES = 4000
FLOAT_MAX = 1.7976931348623157e308


class BadJson(ValueError):
    """A value JSON cannot hold, or a context beyond the limits; says where."""


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadJson(f"{where} holds a lone surrogate (not valid Unicode)") from None


def check_json(value: Any, where: str = "context") -> int:
    """Raise BadJson for what standard JSON cannot hold or what exceeds the limits;
    returns the number of scalar values. Iterative: depth costs no stack."""
    leaves, stack = 0, [(value, where, 0)]
    while stack:
        v, at, depth = stack.pop()
        if depth > MAX_CONTEXT_DEPTH:
            raise BadJson(f"{where} is nested deeper than {MAX_CONTEXT_DEPTH} levels")
        if isinstance(v, dict):
            for k, item in v.items():
                _check_text(k, f"a key in {at}")
                stack.append((item, f"{at}.{k}"[:200], depth + 1))
            continue
        if isinstance(v, list):
            stack.extend((item, f"{at}[{i}]"[:200], depth + 1) for i, item in enumerate(v))
            continue
        leaves += 1
        if leaves > MAX_CONTEXT_LEAVES:
            raise BadJson(f"{where} holds more than {MAX_CONTEXT_LEAVES} values")
        _check_scalar(v, at)
    return leaves


def _check_scalar(v: Any, at: str) -> None:
    if isinstance(v, bool) or v is None:
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise BadJson(f"{at} is {v!r}: NaN and Infinity are not JSON")
    if isinstance(v, int) and abs(v) > FLOAT_MAX:
        raise BadJson(f"{at} is a number outside the float range")
    if isinstance(v, str):
        _check_text(v, at)


class PredictRequest(BaseModel):
    """The request the orchestrator sends."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=4000)
    agent_type: str = Field("auto", min_length=1, max_length=100)
    query_type: Literal["auto", "info", "execute"] = "auto"
    context: dict[str, Any] = Field(default_factory=dict)
    # an execute request's decision id (a new UUID when absent): the same id, the same
    # answer from the same model, and the decision logged once
    decision_id: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[\w.:-]+$")

    @field_validator("task", "agent_type")
    @classmethod
    def _text(cls, v: str, info) -> str:
        # (a lone surrogate never gets here: pydantic's own str check refuses it)
        if not v.strip():
            raise ValueError(f"{info.field_name} must not be blank")
        return v.strip()

    @field_validator("context")
    @classmethod
    def _context(cls, v: dict) -> dict:
        check_json(v)
        c = v.get("candidates")
        if c is not None and (
            not isinstance(c, list)
            or not c
            or len(c) > MAX_CANDIDATES
            or not all(isinstance(a, dict) and a for a in c)
        ):
            raise ValueError(
                f"context.candidates must be a list of 1 to {MAX_CANDIDATES} non-empty JSON objects"
            )
        return v


class RewardRequest(BaseModel):
    """POST /reward: the reward a decision earned."""

    model_config = ConfigDict(extra="forbid")

    decision_id: str = Field(min_length=1, max_length=100)
    reward: float = Field(allow_inf_nan=False)
    at: datetime | None = None  # when it was earned (default: when it arrives)
