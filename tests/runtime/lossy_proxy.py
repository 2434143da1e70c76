"""A TCP proxy in front of the real Redis that can lose one reply, as a dropped connection does.

    async with LossyProxy(redis_url) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url)
        proxy.lose_reply(containing=b"marker")   # the next reply holding b"marker" never arrives
        proxy.lose_reply(after=b"EVALSHA")       # nor the reply to the next request naming EVALSHA

Redis has executed the command whose reply is lost; the proxy then closes that client
connection, so the client sees a connection error (and, if it retries, sends the command again).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from urllib.parse import urlsplit


class LossyProxy:
    """Forwards every client connection to Redis; drops one armed reply and that connection."""

    def __init__(self, redis_url: str) -> None:
        self._upstream = urlsplit(redis_url)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._containing: bytes | None = None
        self._after: bytes | None = None
        self.lost = 0  # replies lost so far
        self.url = ""

    def lose_reply(self, *, containing: bytes | None = None, after: bytes | None = None) -> None:
        """Arm once: lose the next reply that holds `containing`, or the next reply on a
        connection after a request that holds `after`."""
        self._containing, self._after = containing, after

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        u = self._upstream
        if u.scheme == "unix":
            return await asyncio.open_unix_connection(u.path)
        return await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._open_upstream()
        lose_next = asyncio.Event()

        async def to_redis() -> None:
            while data := await reader.read(65536):
                if self._after is not None and self._after in data:
                    self._after = None
                    lose_next.set()
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if lose_next.is_set() or (self._containing is not None and self._containing in data):
                    self._containing = None
                    self.lost += 1
                    return  # the reply is gone, and with it this connection
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(to_redis()), asyncio.ensure_future(to_client())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for p in pumps:
                p.cancel()
            for w in (writer, up_writer):
                w.transport.abort()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        db = self._upstream.path.lstrip("/") if self._upstream.scheme != "unix" else "0"
        self.url = f"redis://127.0.0.1:{port}/{db or 0}"
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
