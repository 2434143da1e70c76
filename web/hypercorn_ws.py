"""Two WebSocket behaviours Hypercorn lacks, patched in at start-up (Hypercorn 0.16-0.18).

- permessage-deflate off: server-side compression tripled memory per socket (38 -> 131 KB) here.
- heartbeat: Hypercorn sends a protocol ping every `websocket_ping_interval` but never notices a
  missing pong; we drop a socket that has not answered the previous ping (docs/websocket.md: 5 s heartbeat).
"""

from __future__ import annotations

import asyncio

from hypercorn.protocol import ws_stream as H
from hypercorn.protocol.events import StreamClosed
from wsproto.events import CloseConnection, Message, Ping, Pong
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError  # noqa: F401 - import check for the wsproto API

_applied = False


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


async def _send_pings(self: H.WSStream) -> None:
    self._kairos_ping_task = asyncio.current_task()
    self._kairos_pong = True
    while not self.closed:
        if not self._kairos_pong:
            # The previous ping went unanswered for a whole interval: the peer is gone.
            await self._send_wsproto_event(CloseConnection(code=1011, reason="Heartbeat missed"))
            await self.handle(StreamClosed(stream_id=self.stream_id))  # tells the app: disconnect
            await self.send(StreamClosed(stream_id=self.stream_id))  # closes the transport
            return
        self._kairos_pong = False
        await self._send_wsproto_event(Ping())
        await self.context.sleep(self.config.websocket_ping_interval)
