"""`valifi stack` knows the processes it started, whatever the wall clock does."""

from __future__ import annotations

import json
import sys

import psutil
import pytest

from core.settings import Settings
from valifi import stack


@pytest.fixture
def started(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    svc = stack.Service(
        "sleeper", "-", None, None, [sys.executable, "-c", "import time; time.sleep(60)"], {}
    )
    proc = stack._start(settings, svc)
    yield settings, proc
    proc.kill()
    proc.wait(10)


def test_a_started_process_is_recognised(started):
    settings, proc = started
    assert stack._recorded_process(settings, "sleeper").pid == proc.pid


def test_a_step_of_the_wall_clock_does_not_disown_it(started, monkeypatch):
    """The kernel's boot time (/proc/stat btime) moves with the wall clock; psutil's
    create_time moves with it. A stack that compared create_times took its own
    MLflow for a stranger after such a step and refused to start, port taken."""
    settings, proc = started
    booted = psutil.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: booted + 5.0)
    assert abs(psutil.Process(proc.pid).create_time() - proc.create_time()) > 4  # it moved
    assert stack._recorded_process(settings, "sleeper").pid == proc.pid


def test_another_process_with_the_recorded_pid_is_not_ours(started):
    settings, _ = started
    record = stack._pidfile(settings, "sleeper")
    data = json.loads(record.read_text())
    data["started_after_boot_s"] -= 30  # a process started 30 s earlier under this pid
    record.write_text(json.dumps(data))
    assert stack._recorded_process(settings, "sleeper") is None
