"""Batching that costs no latency when the server is idle.

LitServe's batched loop waits `batch_timeout` for every batch to fill, polling its
queue each millisecond, even when a lone request is all there is; with a timeout of
0 it polls without pause and keeps a core busy. This loop waits for the first
request without polling, then collates as LitServe does: with `batch_timeout` 0
(our default) it takes whatever else is already waiting, up to `max_batch_size`.
Under load requests pile up while a batch is computed, so batches grow by
themselves; alone, a request is answered at once.

Between batches, once the previous batch's answers have left, the API's
`spare_time(idle)` (if it has one) gets the worker: the shadow scores the
Challenger there (serving.shadow), within its budget, and freely while no request
comes.
"""

from __future__ import annotations

import logging
import time
from queue import Empty

from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError, collate_requests
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

log = logging.getLogger("valifi.serving")

IDLE_WAIT_S = 1.0  # how long one blocking wait lasts before the loop looks again
# no request for this long: the server is idle (work between batches). Not a few ms:
# where the HTTP process and the workers share the cores, a worker waits a few ms
# between batches under full load too, and work done then is taken from the HTTP
# process (at 5 ms, a Challenger in shadow cost 9% of the throughput at 32 clients).
IDLE_GAP_S = 0.05


class _FirstThen:
    """A queue view that yields `first`, then what the real queue holds."""

    def __init__(self, first, queue):
        self.first, self.queue = first, queue

    def _take_first(self):
        first, self.first = self.first, None
        return first

    def get_nowait(self):
        return self._take_first() if self.first is not None else self.queue.get_nowait()

    def get(self, block: bool = True, timeout: float | None = None):
        if self.first is not None:
            return self._take_first()
        return self.queue.get(block=block, timeout=timeout)


class DrainingBatchedLoop(BatchedLoop):
    def get_batch_requests(self, lit_api, request_queue, transport):
        first = self._spare_time(lit_api, request_queue)
        if first is None:
            try:
                first = request_queue.get(timeout=IDLE_WAIT_S)
            except Empty:
                return [], []
        view = _FirstThen(first, request_queue)
        batch = collate_requests(self, lit_api, view, transport)
        if view.first is not None:
            # never asked for it: with a `batch_timeout`, LitServe's collation gives up
            # once the timeout has passed, and it can pass before the first look (the
            # worker kept off the core for a moment). Dropped here, the request taken
            # from the queue would never be answered.
            return self._admit(lit_api, view.first, transport)
        return batch

    def _admit(self, lit_api, request, transport) -> tuple[list, list]:
        """One request as LitServe's collation takes it in: a batch of it alone, or a
        time-out if it waited longer than the request timeout."""
        if request == _SENTINEL_VALUE:
            raise _StopLoopError()
        response_queue_id, uid, timestamp, x_enc = request
        kind = LoopResponseType.STREAMING if lit_api.stream else LoopResponseType.REGULAR
        self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, kind)
        timeout = lit_api.request_timeout
        if timeout not in (-1, False) and time.monotonic() - timestamp > timeout:
            return [], [(response_queue_id, uid)]
        return [(response_queue_id, uid, x_enc)], []

    @staticmethod
    def _spare_time(lit_api, request_queue):
        """The API's work between batches (`spare_time(idle)`, one piece per call, and
        `has_spare_work()`), once the previous batch's answers have left: one piece
        within its budget first, then one more after each IDLE_GAP_S in which no
        request came. Returns a request that came meanwhile, if one did."""
        work = getattr(lit_api, "spare_time", None)
        if work is None:
            return None
        try:
            # one piece within the budget, whatever waits: a request that came meanwhile
            # waits for one piece at most (spending all the credit saved up at once
            # held requests up to MAX_CREDIT_S)
            work(False)
            # idle: a piece after each IDLE_GAP_S without a request (piece after piece
            # once idle cost 18% and 12% of the throughput at 8 and 32 clients in one
            # run: lulls that short come under load too)
            while lit_api.has_spare_work():
                try:
                    return request_queue.get(timeout=IDLE_GAP_S)
                except Empty:
                    work(True)
        except Exception:  # never let it stop the loop
            log.exception("work between batches failed")
        return None
