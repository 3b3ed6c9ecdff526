"""Answers rendered in the worker carry their labels; the metrics count them from there."""

import asyncio
import json

from serving import metrics
from serving.api import _error, encoded


def _count(kind: str, version: str, code: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "valifi_http_requests_total", {"type": kind, "model_version": version, "status": code}
    )
    return value or 0.0


def _serve(response, path: str = "/predict") -> list[dict]:
    """Send `response` through the metrics middleware; the ASGI messages sent."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        await response(scope, receive, send)

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": []}
    asyncio.run(metrics.PredictMetricsMiddleware(app)(scope, receive, send))
    return sent


def test_an_encoded_answer_is_the_json_of_the_answer_with_its_labels_in_headers():
    answer = {"type": "execution", "model_version": "7", "answer": "naïve ✓", "probability": 0.5}
    response = encoded(answer)
    assert json.loads(response.body) == answer
    assert response.media_type == "application/json"
    assert response.headers[metrics.TYPE_HEADER] == "execution"
    assert response.headers[metrics.VERSION_HEADER] == "7"
    assert encoded(response) is response  # a response made already passes through


def test_the_middleware_counts_from_the_headers_without_reading_the_body():
    response = encoded({"type": "execution", "model_version": "41"})
    response.body = b"not json"  # were the body parsed, this would count as an error
    before = _count("execution", "41", "200")
    _serve(response)
    assert _count("execution", "41", "200") == before + 1


def test_errors_carry_labels_and_answers_without_them_are_still_read_from_the_body():
    before = _count("error", "none", "422")
    _serve(_error(422, "bad request"))
    assert _count("error", "none", "422") == before + 1
    from fastapi.responses import JSONResponse

    before = _count("info", "3", "200")
    _serve(JSONResponse({"type": "info", "model_version": "3"}))  # no label headers
    assert _count("info", "3", "200") == before + 1
