"""What each inference worker reports about itself, for GET /status and the watch.

Workers are processes of their own; each writes `<pid>.json` into the folder named
by `VALIFI_SERVER_STATUS_DIR` (set by `valifi serve`) after every registry poll,
and the HTTP processes read them all. Light on purpose: the command imports it
before anything sets up Prometheus' multiprocess mode.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from core.settings import ALIAS, Settings

STATUS_DIR_ENV = "VALIFI_SERVER_STATUS_DIR"


def process_alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def degraded(live: list[dict], expected: int, patience_s: float) -> list[str]:
    """Why the server does not serve what the registry says, if it does not."""
    now = time.time()
    problems = []
    if len(live) < expected:
        problems.append(f"{len(live)} of {expected} workers running")
    for w in live:
        since = w.get("behind_since")
        if since and now - since > patience_s:
            problems.append(
                f"worker {w['worker']} serves v{w.get('version')} while {ALIAS} is "
                f"v{w.get('alias_version')} (for {now - since:.0f} s)"
            )
    return problems


def worker_status(settings: Settings) -> dict:
    """Each inference worker's own report (files they write after every poll)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    workers = []
    for f in sorted(Path(folder).glob("*.json")) if folder else []:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now; the next read has it
        doc["alive"] = process_alive(int(doc["worker"]))
        workers.append(doc)
    live = [w for w in workers if w["alive"]]
    served = {w["version"] for w in live}
    problems = degraded(live, settings.serve.workers, 2 * settings.serve.poll_interval_s)
    return {
        "model": settings.model_name,
        "alias": ALIAS,
        "state": "degraded" if problems else "ok",
        "problems": problems,
        "expected_workers": settings.serve.workers,
        "versions": sorted(v or "none" for v in served),
        "decisions": decisions_logged(live),
        "shadow": shadow_state(live),
        "workers": workers,
    }


def shadow_state(live: list[dict]) -> dict:
    """The Challenger across the live workers: what the alias names, what each worker
    scores, and the counts of the decisions taken up. Never part of the server's own
    state: a missing or failing Challenger does not degrade Production."""
    docs = [w.get("shadow") or {} for w in live]
    alias = {d.get("alias_version") for d in docs} - {None}
    if not alias:
        return {"state": "off", "summary": "no Challenger: nothing is scored in shadow"}
    counts = {k: sum(d.get(k, 0) for d in docs) for k in ("scored", "skipped", "error", "missing")}
    states = {d.get("state") for d in docs}
    state = "scoring" if states == {"scoring"} else sorted(states - {"scoring"})[0]
    versions = sorted(alias)
    problems = [
        f"worker {w['worker']}: {d['last_outcome']['outcome']}: {d['last_outcome']['reason']}"
        for w, d in zip(live, docs, strict=True)
        if d.get("state") != "scoring" and d.get("last_outcome")
    ]
    summary = (
        f"Challenger v{', v'.join(versions)}: {state}; "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + (f" ({'; '.join(problems)})" if problems else "")
    )
    return {
        "state": state,
        "alias_versions": versions,
        "versions": sorted({str(d.get("version")) for d in docs if d.get("version")}),
        "problems": problems,
        "summary": summary,
        **counts,
    }


def decisions_logged(live: list[dict]) -> str:
    """Whether the live workers log their decisions, in a phrase."""
    logs = [w.get("decision_log") or {} for w in live]
    if not logs:
        return "no worker running"
    off = [d.get("reason") for d in logs if not d.get("logging")]
    if off:
        return f"not logged: {off[0]}"
    spooling = [d for d in logs if d.get("state") == "spooling"]
    if spooling:
        waiting = max(d.get("spooled", 0) for d in spooling)
        return f"spooled to disk ({waiting} waiting): {spooling[0].get('reason')}"
    return f"logged ({sum(d.get('written', 0) for d in logs)} written)"
