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
