"""Each inference worker's decision log: execute decisions written to `agent_decisions`
(and the shadow's rows to `agent_shadow`, by a log of their own) off the request's
path, and never lost while the database is away.

`put` only queues (bounded: past `max_queue` records go straight to the spool). A
thread of its own takes what is queued, up to `batch` records, waiting up to
`flush_s` after the first for the rest, and writes them in one transaction. When the
database cannot be reached, the batch is written to a spool file (a JSON line per
decision, fsynced, renamed into place whole) and the database is tried again after
`retry_s`; once it answers, the spool files are replayed, oldest first, and removed.
A decision already logged is left as it is, so a replay or a retried request never
logs one twice.
Spool files are claimed by renaming, so workers that share a spool folder (and a
worker restarted after a crash) never replay one file twice at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

from core import decisions
from serving.status import process_alive

log = logging.getLogger("valifi.serving.decisions")


class DecisionLog:
    def __init__(
        self,
        url: str | None,
        spool: Path,
        batch: int = 256,
        flush_s: float = 0.2,
        max_queue: int = 10_000,
        retry_s: float = 2.0,
        table: decisions.Log = decisions.DECISIONS,
    ):
        self.url, self.table = url, table
        self.spool = Path(spool)
        self.batch, self.flush_s, self.retry_s = batch, flush_s, retry_s
        self.queue: queue.Queue[dict] = queue.Queue(max_queue)
        self.written = 0  # decisions written to the database by this worker
        self.error: str | None = None  # why the database is not being written, if so
        self._conn = None
        self._retry_at = 0.0
        self._spool_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_change = lambda: None  # called when the database goes away or returns

    @property
    def enabled(self) -> bool:
        return self.url is not None

    # -- the request side --
    def put(self, records: list[dict]) -> None:
        """Queue decisions for the database; never blocks, never raises."""
        if not self.enabled:
            return
        overflow = []
        for r in records:
            try:
                self.queue.put_nowait(r)
            except queue.Full:
                overflow.append(r)
        if overflow:
            self._to_spool(overflow)

    # -- the thread --
    def start(self) -> DecisionLog:
        if self.enabled:
            self.spool.mkdir(parents=True, exist_ok=True)
            self._reclaim_orphans()
            self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        # the table is there from the start, not from the first batch (flush_s later);
        # a database away now is found by the first write
        with contextlib.suppress(Exception):
            self._connection()
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # never let the log die: the next step tries again
                log.exception("decision log step failed")
                time.sleep(self.flush_s)

    def _step(self) -> None:
        batch = self._take(self.flush_s)
        if batch:
            self._write(batch)
        elif self.error is None or time.monotonic() >= self._retry_at:
            self._replay()

    def _take(self, wait_s: float, linger: bool = True) -> list[dict]:
        """Up to `batch` queued decisions: the first within `wait_s`, then those that
        came within `flush_s` of it. Writing each decision as it comes would cost a
        transaction apiece at a light load (most of the worker's CPU for the log)."""
        try:
            first = self.queue.get(timeout=wait_s)
        except queue.Empty:
            return []
        if linger and self.queue.qsize() < self.batch - 1:
            self._stop.wait(self.flush_s)  # the rest of the batch, unless stopping
        out = [first]
        while len(out) < self.batch:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    def _write(self, batch: list[dict]) -> None:
        """To the database, or (while it is away) to the spool."""
        if self.error is not None and time.monotonic() < self._retry_at:
            self._to_spool(batch)
            return
        try:
            self.table.insert(self._connection(), batch)
        except Exception as exc:
            self._down(exc)
            self._to_spool(batch)
            return
        self.written += len(batch)
        if self.error is not None:
            log.info("decision log: the database answers again")
            self.error = None
            self._replay()
            self.on_change()

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = decisions.connect(self.url, self.table)
        return self._conn

    def _down(self, exc: Exception) -> None:
        first = self.error is None
        if first:
            log.warning("decision log: database unreachable, spooling to %s: %s", self.spool, exc)
        self.error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        self._retry_at = time.monotonic() + self.retry_s
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if first:
            self.on_change()

    # -- the spool --
    def _to_spool(self, records: list[dict]) -> None:
        """One file per batch, fsynced and renamed into place whole."""
        with self._spool_lock:
            self.spool.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns():020d}-{os.getpid()}"
            tmp = self.spool / f".{name}.tmp"
            with open(tmp, "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.spool / f"{name}.jsonl")

    def spooled(self) -> int:
        """Decisions waiting in spool files (this worker's and others')."""
        total = 0
        for p in self.spool.glob("*.jsonl"):
            try:
                with open(p) as f:
                    total += sum(1 for _ in f)
            except OSError:
                continue
        return total

    def _replay(self) -> None:
        """Write the spool files to the database, oldest first; stop at the first error."""
        for path in sorted(self.spool.glob("*.jsonl")) if self.enabled else []:
            claimed = path.with_name(f"{path.stem}.claim-{os.getpid()}")
            try:
                os.rename(path, claimed)  # another worker may have taken it first
            except OSError:
                continue
            try:
                records = [json.loads(line) for line in claimed.read_text().splitlines() if line]
                for i in range(0, len(records), self.batch):
                    self.table.insert(self._connection(), records[i : i + self.batch])
            except Exception as exc:
                os.rename(claimed, path)  # back for the next try
                self._down(exc)
                return
            claimed.unlink()
            self.written += len(records)
            log.info("decision log: %d spooled decisions written from %s", len(records), path.name)

    def _reclaim_orphans(self) -> None:
        """Claimed files of a worker that died while replaying them go back in line."""
        for p in self.spool.glob("*.claim-*"):
            pid = int(p.name.rsplit("-", 1)[1])
            if not process_alive(pid):
                os.replace(p, p.with_name(p.name.split(".claim-")[0] + ".jsonl"))

    # -- stopping and reporting --
    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, then write what is queued (to the database or the spool)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while batch := self._take(0.0, linger=False):
            self._write(batch)

    def status(self) -> dict:
        if not self.enabled:
            return {
                "logging": False,
                "state": "off",
                "reason": "no database configured (DATABASE_URL): decisions are not logged",
            }
        return {
            "logging": True,
            "state": "ok" if self.error is None else "spooling",
            "reason": self.error,
            "written": self.written,
            "queued": self.queue.qsize(),
            "spooled": self.spooled(),
        }
