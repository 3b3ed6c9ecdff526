"""Watch a freshly promoted version on the agent server; roll back when it misbehaves.

First the rollout: every inference worker must report (GET /status) that it
serves the new version within `converge_s`; a worker that could not load it
keeps serving the old one, and that is a failed rollout. Then, for a window, the
server's Prometheus /metrics: requests, server errors (5xx) and latency of the
new version, and the latency the previous version had. A 5xx that no worker
labelled (a framework error or a timeout) counts against the new version too.
The alias moves back (with the reason recorded in the registry's audit) when the
rollout fails, the new version's error rate exceeds the limit, or its p99 latency
exceeds the previous version's by the allowed ratio — but only while `Production`
still points at the version that was watched.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

from core.registry import AliasMoved, Registry
from core.settings import WatchSpec

_LINE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


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


UNLABELLED = "none"  # what the server labels an answer no model version produced


def stats(samples: list[tuple[str, dict, float]], version: str) -> VersionStats:
    """Requests, 5xx and latency of `version`; 5xx answers no worker labelled count too."""
    s = VersionStats(buckets={})
    for name, labels, value in samples:
        mine = labels.get("model_version") == version
        if name == "valifi_http_requests_total" and labels.get("status", "").startswith("5"):
            if mine or labels.get("model_version") == UNLABELLED:
                s.requests += value
                s.errors += value
            continue
        if not mine:
            continue
        if name == "valifi_http_requests_total":
            s.requests += value
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


def breach(spec: WatchSpec, new: VersionStats, previous_p99: float | None) -> str | None:
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
        reason = breach(spec, new, prev_p99)
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


def workers(url: str) -> dict:
    """The server's own report of its inference workers (GET /status)."""
    r = httpx.get(f"{url.rstrip('/')}/status", timeout=10)
    r.raise_for_status()
    return r.json()


def converge(url: str, version: str, spec: WatchSpec, log: Callable[[str], None] = print):
    """None once every worker serves `version`; else, after `spec.converge_s`, the reason."""
    deadline = time.monotonic() + spec.converge_s
    seen = "no answer from /status"
    while True:
        try:
            st = workers(url)
            live = [w for w in st["workers"] if w.get("alive", True)]
            on = [w for w in live if w.get("version") == version]
            if len(on) == len(live) >= st["expected_workers"]:
                log(f"rollout of v{version}: all {len(on)} workers serve it")
                return None
            seen = (
                ", ".join(
                    f"worker {w['worker']} on v{w.get('version')} "
                    f"({(w.get('last_outcome') or {}).get('outcome', 'no reload yet')})"
                    for w in live
                )
                + f"; {len(live)} of {st['expected_workers']} workers alive"
            )
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            seen = f"/status unreadable: {exc}"
        if time.monotonic() >= deadline:
            return (
                f"rollout failed: not every worker serves v{version} "
                f"after {spec.converge_s:g} s ({seen})"
            )
        time.sleep(min(spec.poll_s, 1.0))


def watch_and_rollback(
    registry: Registry,
    url: str,
    version: str,
    previous: str | None,
    spec: WatchSpec,
    by: str,
    move_id: str,
    log: Callable[[str], None] = print,
) -> dict:
    """Watch `version` on the server at `url`; roll back to `previous` on a breach, but
    only while `Production` still holds `version`. What happened, as a dict."""
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        log(f"no agent server answering at {url} ({exc}): nothing to watch")
        return {"watched": False, "reason": f"no agent server at {url}", "rolled_back_to": None}
    reason = converge(url, version, spec, log)
    if reason is None:
        result = watch(url, version, previous, spec, log)
        out = {"watched": True, **result.to_dict()}
        reason = result.reason if result.breached else None
    else:
        out = {"watched": True, "version": version, "previous": previous, "reason": reason}
    out |= {"breached": reason is not None, "rolled_back_to": None}
    if reason is None:
        return out
    if not previous:
        out["reason"] = f"{reason}; no earlier version to roll back to"
        return out
    try:
        record = registry.rollback(
            f"automatic rollback of v{version}: {reason}",
            to=previous,
            by=by,
            expected=version,
            move_id=move_id,
        )
    except AliasMoved as exc:
        out["reason"] = f"{reason}; not rolled back: {exc}"
        log(out["reason"])
        return out
    out["rolled_back_to"] = record["to"]
    log(f"rolled back v{version} -> v{previous}: {reason}")
    return out
