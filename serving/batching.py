"""Batching that costs no latency when the server is idle.

LitServe's batched loop waits `batch_timeout` for every batch to fill, polling its
queue each millisecond, even when a lone request is all there is; with a timeout of
0 it polls without pause and keeps a core busy. This loop waits for the first
request without polling, then collates as LitServe does: with `batch_timeout` 0
(our default) it takes whatever else is already waiting, up to `max_batch_size`.
Under load requests pile up while a batch is computed, so batches grow by
themselves; alone, a request is answered at once.

Between batches, once the previous batch's answers have left, the API's
`between_batches(busy)` (if it has one) gets the worker: the shadow scores the
Challenger there (serving.shadow); `busy()` says whether requests are waiting.
"""

from __future__ import annotations

import logging
from queue import Empty

from litserve.loops.base import collate_requests
from litserve.loops.simple_loops import BatchedLoop

log = logging.getLogger("valifi.serving")

IDLE_WAIT_S = 1.0  # how long one blocking wait lasts before the loop looks again


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
        between = getattr(lit_api, "between_batches", None)
        if between is not None:  # the previous batch's answers have left
            try:
                between(lambda: not request_queue.empty())
            except Exception:  # never let it stop the loop
                log.exception("work between batches failed")
        try:
            first = request_queue.get(timeout=IDLE_WAIT_S)
        except Empty:
            return [], []
        return collate_requests(self, lit_api, _FirstThen(first, request_queue), transport)
