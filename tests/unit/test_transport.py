"""The queues between the HTTP process and the inference workers (serving.transport)."""

from __future__ import annotations

import asyncio
import inspect
from multiprocessing.queues import Queue as PipeQueue

import litserve as ls
import pytest
from litserve.transport.process_transport import MPQueueTransport

from core.settings import Settings
from serving.api import build_server
from serving.transport import _SPAWN, AgentServer, PipeTransport


def _answer(transport: PipeTransport, requests, n: int) -> None:
    """A stand-in worker in a spawned process: each request back as its answer."""
    for _ in range(n):
        consumer, uid, payload = requests.get(timeout=30)
        transport.send((uid, (payload * 2, "ok")), consumer_id=consumer)


def test_answers_cross_from_a_spawned_worker_in_order():
    transport = PipeTransport.for_consumers(2)
    requests = _SPAWN.Queue()
    worker = _SPAWN.Process(target=_answer, args=(transport, requests, 300))
    worker.start()
    try:
        for i in range(300):
            requests.put((1, f"u{i}", i))

        async def receive() -> list:
            return [await transport.areceive(1, timeout=30) for _ in range(300)]

        got = asyncio.run(receive())
    finally:
        worker.join(30)
    assert worker.exitcode == 0
    assert got == [(f"u{i}", (2 * i, "ok")) for i in range(300)]


def test_a_closed_transport_stops_its_reader():
    transport = PipeTransport.for_consumers(1)

    async def after_close():
        transport.close()
        return await transport.areceive(0)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(after_close())


def test_a_wait_with_a_timeout_returns_none_as_litserve_expects():
    transport = PipeTransport.for_consumers(1)
    assert asyncio.run(transport.areceive(0, timeout=0.05)) is None
    transport.close()


@pytest.mark.parametrize("transport", ["pipes", "litserve"])
def test_the_server_puts_its_queues_where_the_setting_says(tmp_path, transport):
    settings = Settings(_env_file=None, data_dir=tmp_path, serve={"transport": transport})
    server = build_server(settings)
    assert isinstance(server, AgentServer)
    manager = server._init_manager(1)
    try:
        (requests,) = server.litapi_request_queues.values()
        if transport == "pipes":
            assert isinstance(requests, PipeQueue)
            assert isinstance(server._transport, PipeTransport)
        else:  # LitServe's own: a proxy of a queue in the manager process
            assert not isinstance(requests, PipeQueue)
            assert isinstance(server._transport, MPQueueTransport)
        server._transport.close()
    finally:
        manager.shutdown()


def test_litserve_still_builds_its_queues_where_the_seam_replaces_them():
    """An upgrade that moves the queues out of `_init_manager` would silently bypass
    the seam: LitServe's run must still call it, and its transport still be made there."""
    assert "self._init_manager(" in inspect.getsource(ls.LitServer.run)
    assert "self._transport = " in inspect.getsource(ls.LitServer._init_manager)
    assert "self.litapi_request_queues[" in inspect.getsource(ls.LitServer._init_manager)


def test_the_default_authorization_is_a_coroutine(tmp_path):
    """FastAPI awaits an async dependency in the event loop; a plain function goes to
    its thread pool on every request."""
    server = build_server(Settings(_env_file=None, data_dir=tmp_path))
    assert inspect.iscoroutinefunction(server.setup_auth())
