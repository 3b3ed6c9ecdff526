"""Follow `models:/valifi-agent@Production` and hot-swap the served model.

Each inference worker runs one watcher thread. Every poll it asks the registry
where the alias points; when it moved, it downloads that version (cached per
version, shared by the workers), loads it beside the serving one, checks the
canary set, and only then swaps one reference. A batch reads the reference once,
so requests in flight finish on the model they started with.

A version that fails to download, load or verify is never served: the worker
keeps what it has, counts and reports the failure, and tries again only when the
alias moves again. While the registry is unreachable the worker keeps serving and
says so; it catches up when the registry returns.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from model.artifact import AgentModel, load

log = logging.getLogger("valifi.serving")


@dataclass(frozen=True)
class Served:
    """What one worker serves: swapped as a whole, never mutated."""

    version: str
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
    history: list[dict] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Watcher:
    """Polls the alias through `resolve()` and loads versions through `fetch()`.

    `resolve() -> version or None` raises when the registry cannot be reached;
    `fetch(version, dst) -> artifact folder` downloads a version.
    """

    def __init__(
        self,
        resolve: Callable[[], str | None],
        fetch: Callable[[str, Path], Path],
        cache_dir: Path,
        poll_s: float = 10.0,
        on_reload: Callable[[str, str], None] | None = None,
    ):
        self.resolve = resolve
        self.fetch = fetch
        self.cache_dir = Path(cache_dir)
        self.poll_s = poll_s
        self.on_reload = on_reload or (lambda outcome, version: None)
        self.served: Served | None = None
        self.status = ReloadStatus()
        self._refused: str | None = None  # version that failed, until the alias moves
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one poll --
    def sync_once(self) -> None:
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
        self.status.registry_reachable, self.status.registry_error = True, None
        self.status.alias_version = target
        if target is None:
            return
        current = self.served.version if self.served else None
        if target != self._refused:
            self._refused = None
        if target == current or target == self._refused:
            return
        self._load(target)

    def _load(self, version: str) -> None:
        started = time.monotonic()
        try:
            model = load(self._cached(version), verify=True)
        except Exception as exc:
            self._refused = version
            self.status.failures += 1
            self._record(version, "failed", f"{type(exc).__name__}: {exc}"[:500])
            shutil.rmtree(self.cache_dir / version, ignore_errors=True)
            log.error(
                "refused version %s, still serving %s: %s",
                version,
                self.served.version if self.served else "nothing",
                exc,
            )
            self.on_reload("failure", version)
            return
        previous = self.served.version if self.served else None
        self.served = Served(version, model, _now())  # the swap: one reference
        self.status.reloads += 1
        took = time.monotonic() - started
        self._record(
            version,
            "loaded",
            f"from v{previous}" if previous else "first model",
            seconds=round(took, 3),
        )
        log.info("now serving version %s (was %s, loaded in %.2f s)", version, previous, took)
        self.on_reload("success", version)

    def _record(self, version: str, outcome: str, reason: str, **extra) -> None:
        entry = {"version": version, "outcome": outcome, "at": _now(), "reason": reason, **extra}
        self.status.last_outcome = entry
        self.status.history = [*self.status.history[-9:], entry]

    def _cached(self, version: str) -> Path:
        """The version's artifact folder, downloaded once and shared by all workers."""
        final = self.cache_dir / version
        if (final / "agent").is_dir():
            return final / "agent"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.cache_dir))
        try:
            agent = self.fetch(version, tmp / "download")
            shutil.move(str(agent), tmp / "agent")
            shutil.rmtree(tmp / "download", ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another worker got there first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / "agent"

    # -- the thread --
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync_once()
            except Exception:  # never let the watcher die
                log.exception("watcher poll failed")

    def stop(self) -> None:
        self._stop.set()
