"""WebSocket serving patched into Hypercorn at start-up (Hypercorn 0.16-0.18).

- `/ws` over HTTP/1.1 is served here, not through ASGI: the upgrade is answered, frames are
  parsed and written by `RawWS` on the connection's own transport, and the web layer's handler
  (`WsApp`) runs inline in the connection's read task. Through ASGI every socket cost ~1 ms of
  CPU to connect (Hypercorn's WSStream and wsproto handshake, Quart's websocket context and its
  tasks, one app task per socket) and ~40 KB of memory; here it is one object per socket and no
  task besides Hypercorn's reader. Fan-out frames are the same bytes for every watcher (server
  frames are unmasked), so the web layer frames an update once and `RawWS.write`s it to each.
- heartbeat: `RawWS.heartbeat` pings, and drops a socket that has not answered the previous ping
  (docs/websocket.md: 5 s heartbeat); the web layer calls it for every socket once per interval.
- For any other WebSocket (HTTP/2), Hypercorn's own stream with these changes: permessage-deflate
  off (server-side compression tripled memory per socket, 38 -> 131 KB), and the same heartbeat.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from typing import Any, Protocol

from hypercorn.protocol import ws_stream as H
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol, H11WSConnection
from wsproto.events import CloseConnection, Message, Ping, Pong
from wsproto.frame_protocol import CloseReason

_applied = False
_app: WsApp | None = None

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PING = b"\x89\x00"  # an empty ping frame (unmasked, FIN)
_CLOSE_WAIT_S = 2.0  # after our close frame, how long the client has to answer before we abort
OPEN, CLOSING, CLOSED = 0, 1, 2


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked (server) text frame: FIN, opcode 1, minimal length encoding."""
    return _frame(0x81, payload)


def _frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with `code` and `reason` (reason cut to fit a control frame)."""
    return _frame(0x88, struct.pack("!H", code) + reason.encode()[:123])


def _unmask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((bytes(mask) * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


class WsApp(Protocol):
    """What `RawWS` calls: the web layer's WebSocket handler."""

    path: bytes  # the request path served this way (b"/ws")

    async def open(self, link: RawWS, target: bytes, headers: dict[str, str]) -> None:
        """The upgrade is accepted: check the request, answer CONNECTED or close the link.
        (`headers`: lower-case names, the first value of each.)"""

    async def message(self, link: RawWS, data: str | bytes) -> None:
        """One whole message from the client."""

    async def closed(self, link: RawWS) -> None:
        """The connection is gone (called once)."""


class RawWS:
    """One HTTP/1.1 WebSocket: RFC 6455 framing on the TCP transport, driven by the connection's
    Hypercorn read task (`handle`) and written to without awaiting (`write`, `close`)."""

    __slots__ = ("app", "transport", "send", "client", "max_size", "state", "pong", "sock", "_head",
                 "_buf", "_parts", "_opcode", "_size", "_skip", "_timer", "_gone")

    def __init__(self, app: WsApp, transport: Any, send: Any, client: Any, max_size: int,
                 head: bytes = b"") -> None:
        self.app, self.transport, self.send, self.client = app, transport, send, client
        # The 101 response, written with the first frame (CONNECTED or a close): one write, one
        # segment for the client to wake up for, instead of two.
        self._head = head
        self.max_size = max_size
        self.state = OPEN
        self.pong = True  # the previous ping (none yet) was answered
        self.sock: Any = None  # the web layer's object for this socket
        self._buf = b""
        self._parts: list[bytes] | None = None  # fragments of the message being received
        self._opcode = 0
        self._size = 0
        self._skip = 0  # payload bytes still to drop (a frame we will not use)
        self._timer: asyncio.TimerHandle | None = None
        self._gone = False

    # -------- writing (no await: to the kernel or the transport's buffer)

    def writable(self) -> bool:
        """Open both ways: no close frame sent or received, transport not closing."""
        return self.state == OPEN and not self.transport.is_closing()

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel (a reader that stopped reading)."""
        return self.transport.get_write_buffer_size()

    def write(self, frames: bytes) -> None:
        """Write whole frames."""
        if self._head:
            frames, self._head = self._head + frames, b""
        self.transport.write(frames)

    def _control(self, frame: bytes) -> None:
        """Write a frame of our own unless the connection is going (uvloop raises on a write to a
        closed transport; the read task has not necessarily seen the end yet)."""
        if not self.transport.is_closing():
            self.write(frame)

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame; the client's answer closes the connection (or, after a while
        without one, we drop it)."""
        if self.state != OPEN:
            return
        self.state = CLOSING
        self._control(close_frame(code, reason))
        self._timer = asyncio.get_running_loop().call_later(_CLOSE_WAIT_S, self.abort)

    def abort(self) -> None:
        """Drop the connection at once (a client that does not even take a close frame)."""
        self.transport.abort()

    def heartbeat(self) -> None:
        """Called once per heartbeat interval: ping, or drop the socket if the previous ping
        went unanswered for a whole interval (the peer is gone)."""
        if self.state != OPEN:
            return
        if not self.pong:
            self.state = CLOSED
            self._control(close_frame(1011, "Heartbeat missed"))
            self.transport.close()  # the read task sees the end and cleans up
            # A close waits for unsent bytes to go out, and a peer that is gone never takes them.
            self._timer = asyncio.get_running_loop().call_later(_CLOSE_WAIT_S, self.abort)
            return
        self.pong = False
        self._control(_PING)

    # -------- reading (in the connection's read task)

    async def handle(self, event: Any) -> None:
        """Hypercorn stream interface: bytes from the client, or the end of the connection."""
        if isinstance(event, StreamClosed):
            await self._gone_now()
        elif self.state != CLOSED:
            await self._received(event.data)

    async def _gone_now(self) -> None:
        if self._gone:
            return
        self._gone = True
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
        await self.app.closed(self)

    async def _received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        while pos < end:
            if self._skip:
                k = min(self._skip, end - pos)
                pos += k
                self._skip -= k
                continue
            if end - pos < 2:
                break
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                head = 4
                if end - pos < head:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 4], "big")
            elif n == 127:
                head = 10
                if end - pos < head:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if b0 & 0x70 or not b1 & 0x80 or (opcode & 0x8 and (n > 125 or not fin)):
                # reserved bits (no extension), unmasked client frame, bad control frame
                return await self._fail(CloseReason.PROTOCOL_ERROR)
            if not opcode & 0x8 and (self.state != OPEN or self._size + n > self.max_size):
                pos += head
                self._skip = 4 + n  # not read into memory: we are closing, or it is too big
                if self.state == OPEN:
                    self.close(CloseReason.MESSAGE_TOO_BIG)
                continue
            if end - pos < head + 4 + n:
                break
            mask = buf[pos + head:pos + head + 4]
            payload = _unmask(buf[pos + head + 4:pos + head + 4 + n], mask)
            pos += head + 4 + n
            if opcode & 0x8:
                if await self._received_control(opcode, payload):
                    return
                continue
            if (opcode == 0) == (self._parts is None):  # continuation without a start, or
                return await self._fail(CloseReason.PROTOCOL_ERROR)  # a new message inside one
            if opcode not in (0, 1, 2):
                return await self._fail(CloseReason.PROTOCOL_ERROR)
            if not fin:
                if self._parts is None:
                    self._parts, self._opcode = [], opcode
                self._parts.append(payload)
                self._size += n
                continue
            if self._parts is not None:
                self._parts.append(payload)
                payload, opcode = b"".join(self._parts), self._opcode
                self._parts, self._size = None, 0
            if opcode == 1:
                try:
                    text: str | bytes = payload.decode()
                except UnicodeDecodeError:
                    return await self._fail(CloseReason.INVALID_FRAME_PAYLOAD_DATA)
            else:
                text = payload
            self._buf = b""
            await self.app.message(self, text)
            if self.state == CLOSED:
                return
            # the handler may have taken a while: new bytes went to a later `_received`
        self._buf = bytes(buf[pos:]) if pos < end else b""

    async def _received_control(self, opcode: int, payload: bytes) -> bool:
        """A control frame; True when the connection is finished."""
        if opcode == 0x9:  # ping
            if self.state == OPEN:
                self._control(_frame(0x8A, payload))
        elif opcode == 0xA:  # pong
            self.pong = True
        elif opcode == 0x8:  # close: answer it (unless it answers ours), then end the connection
            if self.state == OPEN:
                self._control(_frame(0x88, payload[:2] if len(payload) >= 2 else b""))
            self.state = CLOSED
            await self.send(StreamClosed(stream_id=STREAM_ID))
            return True
        else:
            await self._fail(CloseReason.PROTOCOL_ERROR)
            return True
        return False

    async def _fail(self, code: int) -> None:
        """A protocol violation: close frame with `code`, then end the connection."""
        if self.state == OPEN:
            self._control(close_frame(code))
        self.state = CLOSED
        await self.send(StreamClosed(stream_id=STREAM_ID))


def _accept_key(key: str) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip().encode("latin-1") + _GUID).digest())  # noqa: S324 - RFC 6455


def _headers(request: Any) -> dict[str, str]:
    """An h11 request's headers: lower-case name -> its first value."""
    # h11's Headers iterates as a Python Sequence (one __getitem__ per header); its list is direct.
    items = getattr(request.headers, "_full_items", None)
    pairs = ((n, v) for _, n, v in items) if items is not None else iter(request.headers)
    out: dict[str, str] = {}
    for name, value in pairs:
        out.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return out


def _upgrade(request: Any, headers: dict[str, str]) -> str | None:
    """The Sec-WebSocket-Key of a valid HTTP/1.1 WebSocket upgrade request, else None."""
    if request.http_version != b"1.1" or request.method != b"GET":
        return None
    key = headers.get("sec-websocket-key")
    if key is None or headers.get("sec-websocket-version") != "13":
        return None
    if headers.get("upgrade", "").strip().lower() != "websocket":
        return None
    if not any(t.strip().lower() == "upgrade" for t in headers.get("connection", "").split(",")):
        return None
    return key


def apply(app: WsApp | None = None) -> None:
    """Install the patches once per process; `app` serves HTTP/1.1 WebSockets on `app.path`."""
    global _applied, _app
    if app is not None:
        _app = app
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
    original_create = H11Protocol._create_stream

    async def create_stream(self: H11Protocol, request: Any) -> None:
        app = _app
        key = None
        if app is not None and request.target.partition(b"?")[0] == app.path:
            headers = _headers(request)
            key = _upgrade(request, headers)
        # the transport under Hypercorn's TCPServer (its `send` is the server's protocol_send)
        transport = getattr(getattr(getattr(self.send, "__self__", None), "writer", None), "transport", None)
        if key is None or transport is None or self.config.server_names:  # (server_names: Hypercorn's 404)
            await original_create(self, request)
            return
        assert app is not None
        head = b"".join((
            b"HTTP/1.1 101 \r\nsec-websocket-accept: ", _accept_key(key),
            b"\r\nupgrade: WebSocket\r\nconnection: Upgrade\r\n",
            *(b"%s: %s\r\n" % h for h in self.config.response_headers("h11")), b"\r\n"))
        link = RawWS(app, transport, self.stream_send, self.client, self.config.websocket_max_message_size,
                     head)
        self.stream = link  # type: ignore[assignment]
        self.connection = H11WSConnection(self.connection)  # type: ignore[arg-type]
        self.keep_alive_requests += 1
        await self.context.mark_request()
        await app.open(link, request.target, headers)

    H11Protocol._create_stream = create_stream  # type: ignore[method-assign]
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
