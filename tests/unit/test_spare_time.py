"""The batching loop's work between batches never holds a waiting request for long."""

import queue
import time

from serving.batching import IDLE_GAP_S, DrainingBatchedLoop


class Api:
    """Spare work of `pieces` pieces, each allowed by its budget while busy."""

    def __init__(self, pieces: int):
        self.left = pieces
        self.calls: list[bool] = []

    def spare_time(self, idle: bool) -> bool:
        if not self.left:
            return False
        self.left -= 1
        self.calls.append(idle)
        return True

    def has_spare_work(self) -> bool:
        return self.left > 0


def test_with_a_request_waiting_one_budgeted_piece_runs_then_the_request():
    api, q = Api(pieces=10), queue.Queue()
    q.put("request")
    got = DrainingBatchedLoop._spare_time(api, q)
    assert got == "request"
    assert api.calls == [False]  # one piece within the budget, not the whole credit


def test_with_no_request_the_worker_scores_until_the_work_is_done():
    api, q = Api(pieces=4), queue.Queue()
    started = time.monotonic()
    assert DrainingBatchedLoop._spare_time(api, q) is None
    assert api.calls == [False, True, True, True]
    # idle means IDLE_GAP_S without a request before each piece
    assert time.monotonic() - started >= 3 * IDLE_GAP_S


def test_a_request_that_comes_while_idle_is_taken_after_the_piece_at_hand():
    class Arriving(Api):
        def spare_time(self, idle: bool) -> bool:
            done = super().spare_time(idle)
            if len(self.calls) == 3:
                q.put("request")  # comes during the second idle piece
            return done

    api, q = Arriving(pieces=40), queue.Queue()
    assert DrainingBatchedLoop._spare_time(api, q) == "request"
    assert api.calls == [False, True, True]


class Transport:
    def __init__(self):
        self.sent = []

    def send(self, item, consumer_id):
        self.sent.append((consumer_id, item))


class Late:
    """A clock for LitServe's collation that has already passed `batch_timeout` at
    its first look (the worker was kept off the core for a moment)."""

    def __init__(self):
        self.t = time.monotonic()

    def monotonic(self):
        self.t += 1.0
        return self.t


def _api(batch_timeout: float, request_timeout: float = 30.0):
    from types import SimpleNamespace

    return SimpleNamespace(
        batch_timeout=batch_timeout,
        max_batch_size=4,
        request_timeout=request_timeout,
        stream=False,
    )


def test_a_request_taken_from_the_queue_is_batched_even_when_the_batch_timeout_passed_first(
    monkeypatch,
):
    import litserve.loops.base as base

    q = queue.Queue()
    q.put((0, "uid-1", time.monotonic(), {"task": "x"}))
    monkeypatch.setattr(base, "time", Late())
    payloads, timed_out = DrainingBatchedLoop().get_batch_requests(_api(0.02), q, Transport())
    assert payloads == [(0, "uid-1", {"task": "x"})] and timed_out == []


def test_a_request_past_its_timeout_is_answered_as_timed_out_not_dropped(monkeypatch):
    import litserve.loops.base as base

    q = queue.Queue()
    q.put((0, "uid-2", time.monotonic() - 60, {"task": "x"}))
    monkeypatch.setattr(base, "time", Late())
    payloads, timed_out = DrainingBatchedLoop().get_batch_requests(_api(0.02), q, Transport())
    assert payloads == [] and timed_out == [(0, "uid-2")]


def test_with_time_to_collate_the_batch_holds_what_waits_in_order():
    q = queue.Queue()
    for i in range(6):
        q.put((0, f"uid-{i}", time.monotonic(), i))
    payloads, _ = DrainingBatchedLoop().get_batch_requests(_api(0.02), q, Transport())
    assert [p[2] for p in payloads] == [0, 1, 2, 3]  # at most max_batch_size
    payloads, _ = DrainingBatchedLoop().get_batch_requests(_api(0.0), q, Transport())
    assert [p[2] for p in payloads] == [4, 5]
