"""The decision log's writer gathers a light load's decisions into one transaction."""

import time

from serving.decision_log import DecisionLog


class _Recorder:
    """Stands for the table: records each transaction's batch."""

    def __init__(self):
        self.batches: list[list[dict]] = []

    def insert(self, conn, batch):
        self.batches.append(list(batch))


class _Log(DecisionLog):
    def _connection(self):
        return None


def _log(tmp_path, flush_s: float) -> tuple[_Log, _Recorder]:
    table = _Recorder()
    return _Log("postgresql://unused", tmp_path / "spool", flush_s=flush_s, table=table), table


def test_decisions_that_come_within_flush_s_of_the_first_are_one_transaction(tmp_path):
    log, table = _log(tmp_path, flush_s=0.5)
    log.start()
    try:
        for i in range(5):  # a light load: one decision every 20 ms
            log.put([{"id": i}])
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while sum(map(len, table.batches)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        log.close()
    assert [[r["id"] for r in b] for b in table.batches] == [[0, 1, 2, 3, 4]]
    assert log.written == 5


def test_close_writes_what_is_queued_without_waiting(tmp_path):
    log, table = _log(tmp_path, flush_s=30.0)
    log.start()
    log.put([{"id": i} for i in range(3)])
    started = time.monotonic()
    log.close()
    assert time.monotonic() - started < 5
    assert sorted(r["id"] for b in table.batches for r in b) == [0, 1, 2]
