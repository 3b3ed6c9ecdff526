"""The /predict request model: every bad input is a validation error with a reason,
never another exception; property-based over arbitrary JSON-like values."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from serving.requests import (
    MAX_CONTEXT_DEPTH,
    MAX_CONTEXT_LEAVES,
    PredictRequest,
    check_json,
)

TASK = {"task": "Analyze AAPL stock", "agent_type": "trading_advanced"}


def _deep(n: int):
    doc = 1
    for _ in range(n):
        doc = {"a": doc}
    return doc


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"task": "\ud800 buy?"}, "unable to parse raw data as a unicode string"),
        ({**TASK, "agent_type": "x\udfff"}, "unable to parse raw data as a unicode string"),
        ({**TASK, "context": {"note": "\ud800"}}, "context.note holds a lone surrogate"),
        ({**TASK, "context": {"\udc00": 1}}, "a key in context holds a lone surrogate"),
        ({**TASK, "context": {"rsi": float("nan")}}, "NaN and Infinity are not JSON"),
        ({**TASK, "context": {"candidates": [{"size": float("inf")}]}}, "NaN and Infinity"),
        ({**TASK, "context": {"x": 10**400}}, "outside the float range"),
        ({**TASK, "context": {"x": _deep(MAX_CONTEXT_DEPTH + 1)}}, "nested deeper than"),
        ({**TASK, "context": {"x": list(range(MAX_CONTEXT_LEAVES + 1))}}, "more than"),
        ({**TASK, "context": {"candidates": [{}]}}, "non-empty JSON objects"),
        ({"task": "   "}, "task must not be blank"),
    ],
)
def test_each_bad_input_is_a_validation_error_with_the_reason(body, why):
    with pytest.raises(ValidationError) as err:
        PredictRequest(**body)
    assert why in str(err.value)


def test_within_the_limits_is_accepted():
    ok = {"x": _deep(MAX_CONTEXT_DEPTH - 2), "v": list(range(100)), "big": 10**300, "s": "é😀"}
    assert PredictRequest(**TASK, context=ok).context == ok


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None), max_size=20),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(alphabet=st.characters(codec=None), max_size=8), inner, max_size=6),
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(context=st.dictionaries(st.text(max_size=8), json_like, max_size=6), task=st.text())
def test_any_json_like_body_validates_or_is_refused_cleanly(context, task):
    try:
        req = PredictRequest(task=task, context=context)
    except ValidationError:
        return
    # what passes is standard JSON, encodable as UTF-8
    json.dumps(req.model_dump(), allow_nan=False).encode("utf-8")
    assert check_json(req.context) <= MAX_CONTEXT_LEAVES


@settings(max_examples=200, deadline=None)
@given(value=json_like)
def test_check_json_refuses_exactly_what_json_cannot_hold(value):
    try:
        check_json(value)
    except ValueError:
        return
    text = json.dumps(value, allow_nan=False)  # would raise for NaN or Infinity
    text.encode("utf-8")  # would raise for a lone surrogate
    floats = [v for v in _scalars(value) if isinstance(v, float)]
    assert all(math.isfinite(v) for v in floats)


def _scalars(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _scalars(x)
    elif isinstance(v, list):
        for x in v:
            yield from _scalars(x)
    else:
        yield v
