"""How requests reach the inference workers and answers come back: the one place
that knows LitServe's internals (check it when LitServe is upgraded).

LitServe 0.2.19 moves every request and every answer through `multiprocessing.Manager`
queues: each put and each get is a round trip over a socket to the manager process,
and the HTTP process waits for every answer in a thread of its pool (`asyncio.to_thread`
per answer). Its `fast_queue=True` was meant to move answers to ZMQ, but the server
builds its transport settings with a misspelt field (`transport_config=` for
`transport_type=`), so the flag changes nothing in this version.

`AgentServer` replaces both with `multiprocessing` queues (a pipe each, written by a
feeder thread, so a put never waits for the reader) and reads the answers in one
thread per HTTP process that hands them to the event loop in bursts. It also gives
the routes an `async` no-op authorization: LitServe's default is a plain function,
which FastAPI runs in its thread pool on every request. Everything else (batching
loops, worker monitoring, shutdown) is LitServe's own, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import threading
from queue import Empty
from typing import Any

import litserve as ls
from litserve.server import no_auth
from litserve.transport.base import MessageTransport

# the inference workers are spawned (LitServe), so their queues come from that context
_SPAWN = mp.get_context("spawn")

_SENTINEL = None  # LitServe's own: a None answer means "look again"


class PipeTransport(MessageTransport):
    """Answers from the workers to each HTTP process (one queue per process)."""

    def __init__(self, queues: list):
        self._queues = queues
        self._closed = False
        self._inbox: asyncio.Queue | None = None

    @classmethod
    def for_consumers(cls, n: int) -> PipeTransport:
        return cls([_SPAWN.Queue() for _ in range(n)])

    def __getstate__(self) -> dict:  # a worker needs the queues, not this process's reader
        return {"_queues": self._queues, "_closed": False, "_inbox": None}

    def send(self, item: Any, consumer_id: int) -> None:
        self._queues[consumer_id].put(item)

    async def areceive(self, consumer_id: int, timeout: float | None = None, block: bool = True):
        if self._closed:
            raise asyncio.CancelledError("transport closed")
        if self._inbox is None:
            self._inbox = asyncio.Queue()
            self._start_reader(self._queues[consumer_id], asyncio.get_running_loop())
        if timeout is None:
            return await self._inbox.get()
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return _SENTINEL

    def _start_reader(self, queue, loop: asyncio.AbstractEventLoop) -> None:
        inbox = self._inbox

        def deliver(items: list) -> None:
            for item in items:
                inbox.put_nowait(item)

        def read() -> None:
            while not self._closed:
                try:
                    items = [queue.get()]
                    while True:  # what else has come: one wake-up of the loop for all
                        try:
                            items.append(queue.get_nowait())
                        except Empty:
                            break
                    loop.call_soon_threadsafe(deliver, items)
                except (EOFError, OSError, RuntimeError):  # queue closed, or the loop stopped
                    return

        threading.Thread(target=read, name="valifi-answers", daemon=True).start()

    def close(self, send_sentinel: bool = True) -> None:
        self._closed = True
        for queue in self._queues:
            queue.cancel_join_thread()  # never hang this process's exit on an unread pipe
            if send_sentinel:
                with contextlib.suppress(Exception):
                    queue.put_nowait(_SENTINEL)


async def _open() -> None:
    """Every route's authorization when no API key is set in LitServe's own way (ours
    is `serving.api.ApiKeyMiddleware`): nothing to do, in the event loop."""


class AgentServer(ls.LitServer):
    """LitServer with the queues above and an authorization that costs no thread hop."""

    pipes = True  # False: LitServe's own queues (VALIFI_SERVE_TRANSPORT=litserve)

    @staticmethod
    def with_transport(transport: str) -> type[AgentServer]:
        """The server class for the setting `transport` ('pipes' or 'litserve')."""
        return AgentServer if transport == "pipes" else _LitServeQueuesServer

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)  # status dict, shutdown event
        if not self.pipes:
            return manager
        for path in self.litapi_request_queues:
            self.litapi_request_queues[path] = _SPAWN.Queue()
        self._transport.close(send_sentinel=False)  # LitServe's own, never used
        self._transport = PipeTransport.for_consumers(num_api_servers)
        return manager

    def setup_auth(self, lit_api: ls.LitAPI | None = None):
        auth = super().setup_auth(lit_api)
        return _open if auth is no_auth else auth


class _LitServeQueuesServer(AgentServer):
    pipes = False
