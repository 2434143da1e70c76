"""WebSocket behaviours Hypercorn lacks, patched in at start-up (Hypercorn 0.16-0.18).

- permessage-deflate off: server-side compression tripled memory per socket (38 -> 131 KB) here.
- heartbeat: Hypercorn sends a protocol ping every `websocket_ping_interval` but never notices a
  missing pong; we drop a socket that has not answered the previous ping (docs/websocket.md: 5 s heartbeat).
- raw writes: fan-out frames are the same bytes for every watcher (server frames are unmasked),
  so the web layer frames an update once and writes it straight to each socket's TCP transport
  (`RawSocket`), instead of one task and one trip through ASGI/wsproto per socket and frame.
  Hypercorn's own writes (handshake, replies, pings, close) are whole frames too, so the two
  never interleave inside a frame.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

from hypercorn.protocol import ws_stream as H
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, Pong
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError  # noqa: F401 - import check for the wsproto API

_applied = False
_STREAM = "kairos.ws_stream"  # scope["extensions"] key of the Hypercorn stream behind a socket


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked (server) text frame: FIN, opcode 1, minimal length encoding."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class RawSocket:
    """The TCP transport under one accepted HTTP/1.1 WebSocket, for writing ready-made frames."""

    __slots__ = ("stream", "transport")

    def __init__(self, stream: Any, transport: asyncio.WriteTransport) -> None:
        self.stream, self.transport = stream, transport

    @classmethod
    def of(cls, scope: Mapping[str, Any]) -> RawSocket | None:
        """The raw socket of an accepted WebSocket; None if it is not plain HTTP/1.1 over TCP
        (an HTTP/2 WebSocket shares its connection: frames must go through Hypercorn)."""
        stream = scope.get("extensions", {}).get(_STREAM)
        h11 = getattr(getattr(stream, "send", None), "__self__", None)
        if not isinstance(h11, H11Protocol):
            return None
        tcp = getattr(h11.send, "__self__", None)
        transport = getattr(getattr(tcp, "writer", None), "transport", None)
        return None if transport is None else cls(stream, transport)

    def writable(self) -> bool:
        """Open both ways: no close frame sent or received, transport not closing."""
        return (not self.stream.closed and self.stream.connection.state is ConnectionState.OPEN
                and not self.transport.is_closing())

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel (a reader that stopped reading)."""
        return self.transport.get_write_buffer_size()

    def write(self, frames: bytes) -> None:
        """Write whole frames (no await: it goes to the kernel or the transport's buffer)."""
        self.transport.write(frames)

    def abort(self) -> None:
        """Drop the connection at once (a reader so slow that not even a close frame gets out)."""
        self.transport.abort()


def apply() -> None:
    """Install the patches once per process."""
    global _applied
    if _applied:
        return
    _applied = True
    original_init = H.Handshake.__init__

    def init_without_extensions(self: H.Handshake, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)
        self.extensions = None  # never negotiate permessage-deflate

    H.Handshake.__init__ = init_without_extensions  # type: ignore[method-assign]
    H.WSStream._handle_events = _handle_events  # type: ignore[method-assign]
    H.WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    original_handle = H.WSStream.handle

    async def handle(self: H.WSStream, event: object) -> None:
        await original_handle(self, event)
        scope = getattr(self, "scope", None)
        if scope is not None and _STREAM not in scope["extensions"]:
            scope["extensions"][_STREAM] = self  # read by RawSocket.of once the app accepted
        if isinstance(event, StreamClosed):
            # Stop the ping loop now: otherwise the connection's task lingers for up to one
            # ping interval after the socket closed, and shutdown waits for it.
            task = getattr(self, "_kairos_ping_task", None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    H.WSStream.handle = handle  # type: ignore[method-assign]


async def _handle_events(self: H.WSStream) -> None:
    # Same as Hypercorn's, plus: remember that a pong arrived.
    for event in self.connection.events():
        if isinstance(event, Message):
            try:
                self.buffer.extend(event)
            except H.FrameTooLargeError:
                await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                break
            if event.message_finished:
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, Pong):
            self._kairos_pong = True
        elif isinstance(event, CloseConnection):
            if self.connection.state == H.ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            await self.send(StreamClosed(stream_id=self.stream_id))


_PING = b"\x89\x00"  # an empty ping frame (unmasked, FIN)


async def _send_pings(self: H.WSStream) -> None:
    self._kairos_ping_task = asyncio.current_task()
    self._kairos_pong = True
    # Every socket pings every interval (2,000/s at 10,000 sockets): a raw write of the fixed
    # frame skips wsproto, h11 and Hypercorn's send lock and drain, as fan-out frames do.
    raw = RawSocket.of(self.scope)
    while not self.closed:
        if not self._kairos_pong:
            # The previous ping went unanswered for a whole interval: the peer is gone.
            await self._send_wsproto_event(CloseConnection(code=1011, reason="Heartbeat missed"))
            await self.handle(StreamClosed(stream_id=self.stream_id))  # tells the app: disconnect
            await self.send(StreamClosed(stream_id=self.stream_id))  # closes the transport
            return
        self._kairos_pong = False
        if raw is not None and raw.writable():
            raw.write(_PING)
        else:
            await self._send_wsproto_event(Ping())
        await self.context.sleep(self.config.websocket_ping_interval)
