"""The bench's WebSocket client (`bench.loops.Watcher`), which the failover and chaos tests use as
a careful client, against a small WebSocket server of the test's own."""

from __future__ import annotations

import json

import anyio
import pytest
from websockets.asyncio.server import ServerConnection, serve

from bench.loops import Watcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_watcher_asks_for_the_state_after_every_reconnect_even_before_it_saw_one() -> None:
    """A socket closed (1012) before the session's first change reached it: the change may have
    been published while the client had no socket, so the next one must send RECONNECT. (The chaos
    test saw a short session's socket stay at no version at all: it only asked once it had one.)"""
    received: list[dict] = []
    asked = anyio.Event()

    async def server(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "CONNECTED", "sessionId": "s", "timestamp": 0}))
        if not received:
            received.append({"connection": 1})
            await ws.close(1012, "Service restart")
            return
        async for raw in ws:
            received.append(json.loads(raw))
            asked.set()

    async with serve(server, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        watcher = Watcher("s", [f"ws://127.0.0.1:{port}"], "token")
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            with anyio.fail_after(5):
                await asked.wait()
            watcher.stopped = True
            tg.cancel_scope.cancel()
    assert watcher.closes[0][1] == 1012 and watcher.versions == []
    assert received[1:] == [{"type": "RECONNECT", "last_version": None}]
