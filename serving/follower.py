"""Follow `models:/valifi-agent@Production` (and `@Challenger`) and hot-swap the served model.

Each inference worker runs one follower thread (`AliasFollower`). Every poll it asks the registry
where the alias points; when it moved, it downloads that version (cached by
version and run id, shared by the workers), loads it beside the serving one,
checks the canary set, and only then swaps one reference. A batch reads the
reference once, so requests in flight finish on the model they started with. The
model swapped out stays loaded: moving the alias back (a rollback) swaps at once.

Two kinds of failure are told apart. A transient one (the registry or the
network failed, a download broke off) is tried again on the next polls, with
backoff. A verified-bad artifact (unreadable weights, canary mismatch) is never
served: the worker keeps what it has, reports it, and tries again only when the
alias moves. While the registry is unreachable the worker keeps serving and says
so; it catches up when the registry returns.

After every poll the worker writes its status (`status_file`) for the server's
GET /status: which version it serves and how its last reload went.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from core.registry import Version
from model.artifact import AgentModel, load

log = logging.getLogger("valifi.serving")


@dataclass(frozen=True)
class Served:
    """What one worker serves: swapped as a whole, never mutated."""

    version: str
    run_id: str | None
    model: AgentModel
    loaded_at: str


@dataclass
class ReloadStatus:
    registry_reachable: bool | None = None  # None: not asked yet
    registry_error: str | None = None
    last_checked: str | None = None
    last_outcome: dict | None = None  # version, outcome, at, reason
    reloads: int = 0
    failures: int = 0
    alias_version: str | None = None
    behind_since: float | None = None  # when the alias first pointed elsewhere (epoch s)
    history: list[dict] = field(default_factory=list)


def _version_of(served: Served) -> Version:
    return Version(served.version, served.run_id, "")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class AliasFollower:
    """Polls the alias through `resolve()` and fetches versions through `fetch()`.

    `resolve() -> Version or None` raises when the registry cannot be reached;
    `fetch(version) -> artifact folder` downloads a version (raises on any
    transport failure).
    """

    def __init__(
        self,
        resolve: Callable[[], Version | None],
        fetch: Callable[[Version], Path],
        poll_s: float = 10.0,
        on_reload: Callable[[str, str], None] | None = None,
        status_file: Path | None = None,
        device: str = "cpu",
        report: Callable[[], dict] | None = None,
        drop_when_cleared: bool = False,
        borrow: Callable[[Version], Served | None] | None = None,
        on_poll: Callable[[], None] | None = None,
    ):
        self.resolve = resolve
        self.fetch = fetch
        self.poll_s = poll_s
        self.on_reload = on_reload or (lambda outcome, version: None)
        self.status_file = status_file
        self.device = device
        self.report = report or dict  # more of this worker's status (the decision log)
        # the Challenger's follower stops offering its model when the alias is removed
        # (kept as the one before, so that setting it back is instant); Production's
        # keeps serving (an alias removed by mistake must not stop the answers)
        self.drop_when_cleared = drop_when_cleared
        # a version another follower of this worker has loaded and verified, if any (a
        # Challenger promoted to Production swaps in at once)
        self.borrow = borrow or (lambda version: None)
        self.on_poll = on_poll or (lambda: None)  # after each poll (the status written)
        self._write_lock = threading.Lock()
        self.served: Served | None = None
        self._previous: Served | None = None  # the one served before, still loaded
        self.status = ReloadStatus()
        self._refused: Version | None = None  # verified bad, until the alias moves
        self._retry_at = 0.0  # after a transient failure: not before this (monotonic)
        self._backoff = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one poll --
    def sync_once(self) -> None:
        try:
            self._sync()
        finally:
            self.write_status()
            self.on_poll()

    def _sync(self) -> None:
        self.status.last_checked = _now()
        try:
            target = self.resolve()
        except Exception as exc:  # any transport or server error: keep serving
            if self.status.registry_reachable is not False:
                log.warning("registry unreachable, serving what is loaded: %s", exc)
            self.status.registry_reachable = False
            self.status.registry_error = str(exc)[:300]
            return
        if self.status.registry_reachable is False:
            log.info("registry reachable again")
            # what failed while it was away is worth trying now, not after the backoff
            self._retry_at, self._backoff = 0.0, self.poll_s
        self.status.registry_reachable, self.status.registry_error = True, None
        self.status.alias_version = target.version if target else None
        if target is None and self.drop_when_cleared and self.served is not None:
            self._clear()
            return
        if target is None or target == self._serving():
            self.status.behind_since = None
            return
        self.status.behind_since = self.status.behind_since or time.time()
        if target != self._refused:
            self._refused = None
        if target == self._refused or time.monotonic() < self._retry_at:
            return
        previous = self._previous
        if previous is not None and target == _version_of(previous):
            # back to the one before (a rollback): already loaded and checked
            self._swap(replace(previous, loaded_at=_now()), time.monotonic())
            return
        if (lent := self.borrow(target)) is not None:  # loaded and verified beside us
            self._swap(replace(lent, loaded_at=_now()), time.monotonic())
            return
        self._load(target)

    def loaded(self, version: Version) -> Served | None:
        """This follower's model of `version`, if it has it loaded (serving, or the one
        before)."""
        for s in (self.served, self._previous):
            if s is not None and _version_of(s) == version:
                return s
        return None

    def _serving(self) -> Version | None:
        return None if self.served is None else _version_of(self.served)

    def _load(self, target: Version) -> None:
        started = time.monotonic()
        try:
            folder = self.fetch(target)
        except Exception as exc:  # transient: the registry or the network
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 8 * self.poll_s)
            self._fail(target, "retrying", f"download failed: {type(exc).__name__}: {exc}")
            return
        try:
            model = load(folder, verify=True).to(self.device)  # verified on the CPU first
        except Exception as exc:  # verified bad: refused until the alias moves
            self._refused = target
            self._fail(target, "failed", f"{type(exc).__name__}: {exc}")
            return
        self._retry_at, self._backoff = 0.0, self.poll_s
        self._swap(Served(target.version, target.run_id, model, _now()), started)

    def _swap(self, new: Served, started: float) -> None:
        """Serve `new` from the next batch on; the model it replaces stays loaded, so
        that moving the alias back (a rollback) swaps at once, with no download."""
        self.status.behind_since = None
        old, self.served = self.served, new  # the swap
        self._previous = old
        self.status.reloads += 1
        took = time.monotonic() - started
        reason = f"from v{old.version}" if old else "first model"
        self._record(new.version, "loaded", reason, seconds=round(took, 3))
        log.info("now serving version %s (%s, in %.2f s)", new.version, reason, took)
        self.on_reload("success", new.version)

    def _clear(self) -> None:
        """The alias was removed: serve nothing (the model stays loaded as the previous
        one, so that setting the alias back swaps at once)."""
        old, self.served = self.served, None
        self._previous = old
        self.status.behind_since = None
        self._record(old.version, "cleared", "the alias was removed")
        log.info("alias removed: v%s no longer loaded for it", old.version)

    def _fail(self, target: Version, outcome: str, reason: str) -> None:
        self.status.failures += 1
        self._record(target.version, outcome, reason[:500])
        serving = self.served.version if self.served else "nothing"
        log.error("version %s %s, still serving %s: %s", target.version, outcome, serving, reason)
        self.on_reload("failure", target.version)

    def _record(self, version: str, outcome: str, reason: str, **extra) -> None:
        entry = {"version": version, "outcome": outcome, "at": _now(), "reason": reason, **extra}
        self.status.last_outcome = entry
        self.status.history = [*self.status.history[-9:], entry]

    def write_status(self) -> None:
        """This worker's status, atomically, for GET /status (no-op without a file)."""
        if self.status_file is None:
            return
        s = self.served
        doc = {
            "worker": os.getpid(),
            "version": s.version if s else None,
            "run_id": s.run_id if s else None,
            "loaded_at": s.loaded_at if s else None,
            "updated_at": time.time(),
        } | {k: v for k, v in asdict(self.status).items() if k != "history"}
        try:
            doc |= self.report()
        except Exception as exc:  # a report: never let it stop the status
            doc["report_error"] = str(exc)
        tmp = self.status_file.with_name(f".{self.status_file.name}.tmp")
        try:
            with self._write_lock:  # the Challenger's follower writes it too
                tmp.write_text(json.dumps(doc, default=str))
                os.replace(tmp, self.status_file)
        except OSError as exc:  # status is a report: never let it stop serving
            log.warning("could not write worker status: %s", exc)

    # -- the thread --
    def start(self, now: bool = False) -> None:
        """Poll every `poll_s` in a thread of its own (`now`: the first poll at once)."""
        self._thread = threading.Thread(
            target=self._run, args=(now,), name="alias-follower", daemon=True
        )
        self._thread.start()

    def _run(self, now: bool = False) -> None:
        if now:
            self._poll()
        while not self._stop.wait(self.poll_s):
            self._poll()

    def _poll(self) -> None:
        try:
            self.sync_once()
        except Exception:  # never let the follower die
            log.exception("alias follower poll failed")

    def stop(self) -> None:
        self._stop.set()
