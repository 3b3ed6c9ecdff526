"""`valifi serve` as a supervisor: the server's processes live and die together.

LitServe runs HTTP servers and inference workers as processes of their own. The
server runs in a process group of its own under this supervisor, which

- on SIGTERM or SIGINT stops the whole group (TERM, then KILL after a grace
  period), so the port is free when it exits;
- when an inference worker dies, or the server exits by itself, stops what is
  left and exits non-zero, so that the supervisor above (systemd, Docker, the
  `valifi stack`) restarts it: never a half-alive server.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

from core.processes import stop_group

log = logging.getLogger("valifi.serve")


def dead_workers(status_dir: Path) -> list[int]:
    """Workers that reported their status and whose process is gone."""
    from serving.status import process_alive

    dead = []
    for f in Path(status_dir).glob("*.json"):
        pid = int(f.stem) if f.stem.isdigit() else None
        if pid is not None and not process_alive(pid):
            dead.append(pid)
    return dead


def supervise(cmd: list[str], env: dict, status_dir: Path, grace_s: float = 10.0) -> int:
    """Run `cmd` (the server) in a new process group until a signal or a fault."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    asked: list[int] = []

    def on_signal(sig, _frame):
        asked.append(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        while not asked:
            code = proc.poll()
            if code is not None:
                log.error("the server exited by itself (code %s); stopping", code)
                return code or 1
            if dead := dead_workers(status_dir):
                log.error("inference worker(s) %s died; stopping the server", dead)
                return 1
            time.sleep(0.5)
        log.info("signal %s: stopping the server", asked[0])
        return 0
    finally:
        stop_group(proc, grace_s)
