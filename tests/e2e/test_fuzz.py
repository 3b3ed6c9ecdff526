"""Fuzzing the live agent server: nothing a client sends gets a 5xx.

Two generators, against one `valifi serve` (2 workers, a promoted model):

- schemathesis, from the server's own OpenAPI schema: bodies that fit it (positive)
  and bodies that break it (negative);
- a hostile-JSON generator (hypothesis) for what a schema cannot describe: NaN and
  Infinity, numbers beyond float range, lone surrogates, nesting and value counts
  around the limits, huge strings, candidates of every shape, broken JSON, bytes
  that are not UTF-8.

Every answer must be below 500, and every 4xx must say why. Afterwards the server
must be whole (every worker alive, status ok) and its memory within MEMORY_GROWTH_MB
of what it held after warming up.

CI runs a few hundred cases. The long run (10,000 hostile cases and 2,500 of each
schemathesis mode, counts printed):

    VALIFI_FUZZ_CASES=10000 python3 scripts/test.py tests/e2e/test_fuzz.py -s
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import free_port, register_small, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "valifi-agent-fuzz-tests"
CASES = int(os.environ.get("VALIFI_FUZZ_CASES", "300"))
MEMORY_GROWTH_MB = 200  # the word caches are bounded; anything beyond this is a leak
BOTS = ["trading_advanced", "financial_stocks", "analytics_portfolio", "platform_onboarding"]
FUZZ_SETTINGS = settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(stack_env, tmp_path_factory):
    from core.registry import Registry

    uri = stack_env["MLFLOW_TRACKING_URI"]
    version = register_small(uri, MODEL, tmp_path_factory.mktemp("fuzz"), seed=4)
    Registry(uri, MODEL).promote(version, "fuzz tests")
    port = free_port()
    proc = start_server(port, {"VALIFI_MODEL_NAME": MODEL, "VALIFI_SERVE_POLL_INTERVAL_S": "2"})
    url = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{url}/predict", json={"task": "x", "agent_type": BOTS[0]}, timeout=30)
    assert r.status_code == 200, r.text
    yield {"url": url, "proc": proc, "rss_mb": []}
    stop_server(proc)


def _rss_mb(proc) -> float:
    root = psutil.Process(proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def _check(r, counts: Counter) -> None:
    """`r`: an httpx or requests response."""
    counts[r.status_code] += 1
    assert r.status_code < 500, r.text[:500]
    if r.status_code == 413:  # the body-size limit answers before any JSON is read
        return
    body = r.json()
    if r.status_code >= 400:
        assert body["type"] == "error" and body["error"], body
    else:
        assert body["type"] in ("info", "execution"), body


# --- hostile JSON ---------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=[]), max_size=30)  # surrogates too
huge_numbers = st.sampled_from(
    [10**308, 10**309, -(10**400), 2**1024, 1.7976931348623157e308, -0.0, 5e-324]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_numbers,
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.integers(0, 70_000).map(lambda n: "word " * (n // 5)),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(any_text, inner, max_size=6),
    max_leaves=40,
)


def _nest(depth: int) -> dict:
    doc: dict = {"leaf": 1}
    for _ in range(depth):
        doc = {"d": doc}
    return doc


contexts = st.one_of(
    st.dictionaries(any_text, json_values, max_size=8),
    st.integers(10, 40).map(lambda d: {"deep": _nest(d)}),
    st.integers(3990, 4010).map(lambda n: {"v": list(range(n))}),
    st.builds(
        lambda cands, extra: {"candidates": cands, **extra},
        st.one_of(
            st.lists(st.dictionaries(any_text, json_values, max_size=3), max_size=70),
            json_values,
        ),
        st.dictionaries(any_text, json_values, max_size=3),
    ),
    json_values,
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {"task": st.one_of(any_text, json_values)},
        optional={
            "agent_type": st.one_of(st.sampled_from([*BOTS, "auto", "no_such_bot"]), json_values),
            "query_type": st.one_of(st.sampled_from(["auto", "info", "execute"]), json_values),
            "context": contexts,
            "extra": json_values,
        },
    ),
    json_values,
)


@st.composite
def raw_requests(draw) -> bytes:
    body = json.dumps(draw(bodies), allow_nan=True).encode()  # NaN, Infinity, \ud800 as sent
    how = draw(st.sampled_from(["as is"] * 6 + ["cut", "not utf-8", "bytes"]))
    if how == "cut":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if how == "not utf-8":
        at = draw(st.integers(0, len(body)))
        return body[:at] + b"\xff\xfe\xc3" + body[at:]
    if how == "bytes":
        return draw(st.binary(max_size=200))
    return body


def test_hostile_json_never_gets_a_5xx(server):
    counts: Counter = Counter()
    with httpx.Client(timeout=60) as client:

        @FUZZ_SETTINGS
        @given(raw=raw_requests())
        def run(raw: bytes) -> None:
            r = client.post(
                f"{server['url']}/predict",
                content=raw,
                headers={"Content-Type": "application/json"},
            )
            _check(r, counts)
            if sum(counts.values()) == 50:  # warmed up: the memory baseline
                server["rss_mb"].append(_rss_mb(server["proc"]))

        run()
    print(
        f"\nhostile JSON: {sum(counts.values())} requests, by status {dict(sorted(counts.items()))}"
    )
    assert sum(counts.values()) >= CASES
    assert counts[200] and counts[422]  # both sides of the line were reached


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_cases_never_get_a_5xx(server, mode):
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json")
    operation = schema["/predict"]["POST"]
    counts: Counter = Counter()

    @settings(FUZZ_SETTINGS, max_examples=max(50, CASES // 4))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case) -> None:
        _check(case.call(base_url=server["url"], timeout=60), counts)

    run()
    print(f"\nschemathesis {mode}: {sum(counts.values())} requests, by status {dict(counts)}")
    assert sum(counts.values()) >= 50


def test_server_is_whole_after_the_fuzzing(server):
    status = httpx.get(f"{server['url']}/status", timeout=10).json()
    assert status["state"] == "ok" and len(status["workers"]) == 2, status
    assert all(w["alive"] for w in status["workers"])
    assert server["proc"].poll() is None
    r = httpx.post(
        f"{server['url']}/predict", json={"task": "x", "agent_type": BOTS[0]}, timeout=30
    )
    assert r.status_code == 200
    if server["rss_mb"]:
        grown = _rss_mb(server["proc"]) - server["rss_mb"][0]
        print(f"\nserver memory: {server['rss_mb'][0]:.0f} MB after warm-up, grew {grown:+.0f} MB")
        assert grown < MEMORY_GROWTH_MB
