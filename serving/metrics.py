"""Prometheus metrics across LitServe's processes (multiprocess mode).

HTTP servers and inference workers are separate processes, so every process
writes its samples under PROMETHEUS_MULTIPROC_DIR and GET /metrics aggregates
them. `valifi serve` sets that variable before anything imports prometheus_client.

- HTTP side (ASGI middleware): requests and latency by type, model version and
  status, for /predict.
- Worker side: predictions by type, version and outcome, batch sizes, reloads and
  reload failures, and the version each worker serves.
"""

from __future__ import annotations

import json
import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "valifi_http_requests", "POST /predict requests answered", ["type", "model_version", "status"]
)
HTTP_LATENCY = Histogram(
    "valifi_request_latency_seconds",
    "POST /predict latency",
    ["type", "model_version"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "valifi_predictions",
    "requests handled by inference workers",
    ["type", "model_version", "outcome"],
)
BATCH_SIZE = Histogram(
    "valifi_batch_size", "requests per batched forward pass", buckets=(1, 2, 4, 8, 16, 32, 64)
)
RELOADS = Counter("valifi_reloads", "model reloads by outcome", ["outcome", "version"])
SERVING_VERSION = Gauge(
    "valifi_serving_version",
    "registry version each worker serves",
    ["worker"],
    multiprocess_mode="liveall",
)


def _registry():
    """All processes' samples when running multiprocess, else this process's."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def render() -> tuple[bytes, str]:
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def requests_served() -> int:
    """Answered /predict requests over all processes (for the status answer)."""
    registry = _registry()
    total = 0.0
    for metric in registry.collect():
        if metric.name == "valifi_http_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)


# An answer rendered in the worker carries its labels in these headers, so that the
# HTTP process does not parse its body again to count it.
TYPE_HEADER, VERSION_HEADER = "x-valifi-type", "x-valifi-model-version"


def label_headers(answer: dict) -> dict[str, str]:
    """The headers that label an answer (its type and the model version that gave it)."""
    kind, version = _labels_of(answer, 200)
    return {TYPE_HEADER: kind, VERSION_HEADER: version}


class PredictMetricsMiddleware:
    """ASGI middleware: times POST /predict and labels it from the headers that label
    its answer or, for an answer without them, from the JSON it answers."""

    def __init__(self, app, path: str = "/predict", fallback=None):
        self.app = app
        self.path = path
        # For a 5xx no worker labelled (a framework error, a timeout): the version the
        # workers serve, so that the watch counts it against that version.
        self.fallback = fallback or (lambda: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status: dict = {"code": 500, "labels": None}
        body = bytearray()

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["labels"] = _header_labels(message.get("headers") or ())
            elif (
                message["type"] == "http.response.body"
                and status["labels"] is None
                and len(body) < 65536
            ):
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            kind, version = status["labels"] or _labels(bytes(body), status["code"])
            if version == "none" and status["code"] >= 500:
                version = str(self.fallback() or "none")
            HTTP_REQUESTS.labels(kind, version, str(status["code"])).inc()
            HTTP_LATENCY.labels(kind, version).observe(time.perf_counter() - started)


_TYPE, _VERSION = TYPE_HEADER.encode(), VERSION_HEADER.encode()


def _header_labels(headers) -> tuple[str, str] | None:
    found = {k.lower(): v for k, v in headers if k.lower() in (_TYPE, _VERSION)}
    if len(found) < 2:
        return None
    return found[_TYPE].decode("latin-1"), found[_VERSION].decode("latin-1")


def _labels(body: bytes, code: int) -> tuple[str, str]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = {}
    return _labels_of(doc, code)


def _labels_of(doc, code: int) -> tuple[str, str]:
    if not isinstance(doc, dict):
        doc = {}
    kind = doc.get("type") or ("invalid" if 400 <= code < 500 else "error")
    version = doc.get("model_version")
    return str(kind), str(version) if version is not None else "none"
