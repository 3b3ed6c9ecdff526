"""Watch a freshly promoted version on the agent server; roll back when it misbehaves.

Reads the server's Prometheus /metrics for a window: requests, server errors
(5xx) and latency of the new version, and the latency the previous version had.
The alias moves back (with the reason recorded in the registry's audit) when the
new version's error rate exceeds the limit, or its p99 latency exceeds the
previous version's by the allowed ratio.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

_LINE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class WatchSpec:
    window_s: float = 600.0
    poll_s: float = 5.0
    max_error_rate: float = 0.02  # share of 5xx answers
    max_p99_ratio: float = 2.0  # new p99 over previous p99
    min_p99_s: float = 0.25  # below this p99 never counts as a breach
    min_requests: int = 20  # fewer answers than this: no judgement on error rate


@dataclass
class VersionStats:
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] | None = None  # latency histogram: le -> cumulative count

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p99(self) -> float | None:
        return quantile(self.buckets or {}, 0.99)


@dataclass
class WatchResult:
    version: str
    previous: str | None
    breached: bool
    reason: str
    requests: float
    error_rate: float
    p99_s: float | None
    previous_p99_s: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def parse(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def stats(samples: list[tuple[str, dict, float]], version: str) -> VersionStats:
    s = VersionStats(buckets={})
    for name, labels, value in samples:
        if labels.get("model_version") != version:
            continue
        if name == "valifi_http_requests_total":
            s.requests += value
            if labels.get("status", "").startswith("5"):
                s.errors += value
        elif name == "valifi_request_latency_seconds_bucket":
            le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            s.buckets[le] = s.buckets.get(le, 0.0) + value
    return s


def delta(now: VersionStats, before: VersionStats) -> VersionStats:
    b = before.buckets or {}
    return VersionStats(
        now.requests - before.requests,
        now.errors - before.errors,
        {le: c - b.get(le, 0.0) for le, c in (now.buckets or {}).items()},
    )


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile (Prometheus-style, no interpolation
    past the last finite bucket)."""
    if not buckets:
        return None
    total = buckets.get(float("inf"), max(buckets.values()))
    if total <= 0:
        return None
    finite = sorted(le for le in buckets if le != float("inf"))
    for le in finite:
        if buckets[le] >= q * total:
            return le
    return finite[-1] if finite else None


def judge(spec: WatchSpec, new: VersionStats, previous_p99: float | None) -> str | None:
    """The reason to roll back, or None."""
    if new.requests >= spec.min_requests and new.error_rate > spec.max_error_rate:
        return (
            f"error rate {new.error_rate:.1%} of {new.requests:.0f} requests above "
            f"{spec.max_error_rate:.1%}"
        )
    p99 = new.p99()
    if (
        new.requests >= spec.min_requests
        and p99 is not None
        and previous_p99
        and p99 > spec.min_p99_s
        and p99 > spec.max_p99_ratio * previous_p99
    ):
        return (
            f"p99 latency {p99 * 1000:.0f} ms above {spec.max_p99_ratio:g}x the previous "
            f"version's {previous_p99 * 1000:.0f} ms"
        )
    return None


def watch(
    url: str,
    version: str,
    previous: str | None,
    spec: WatchSpec,
    log: Callable[[str], None] = print,
) -> WatchResult:
    """Poll /metrics for `spec.window_s`; returns as soon as a breach is seen."""

    def scrape():
        return parse(httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text)

    start = scrape()
    base = stats(start, version)
    prev_p99 = stats(start, previous).p99() if previous else None
    deadline = time.monotonic() + spec.window_s
    new = VersionStats(buckets={})
    while True:
        now = scrape()
        new = delta(stats(now, version), base)
        if previous:
            prev_p99 = stats(now, previous).p99() or prev_p99
        reason = judge(spec, new, prev_p99)
        if reason or time.monotonic() >= deadline:
            break
        time.sleep(spec.poll_s)
    log(
        f"watch of v{version}: {new.requests:.0f} requests, error rate {new.error_rate:.1%}, "
        f"p99 {new.p99()}; {'BREACH: ' + reason if reason else 'healthy'}"
    )
    return WatchResult(
        version,
        previous,
        reason is not None,
        reason or "healthy",
        new.requests,
        new.error_rate,
        new.p99(),
        prev_p99,
    )
