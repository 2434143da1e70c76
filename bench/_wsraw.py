"""A minimal WebSocket client protocol for the benches: thousands of sockets per process, cheaply.

Just enough RFC 6455 for Kairos' server: the upgrade handshake, unmasked server frames (text,
ping, close), masked client text frames (all-zero mask: legal, and the payload needs no
rewriting) and automatic pongs so the server's heartbeat keeps the socket. No extensions.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Callable

TextHandler = Callable[["RawWs", bytes, int], None]


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked (all-zero mask) client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\x00\x00\x00\x00" + payload


class RawWs(asyncio.Protocol):
    """One client socket; `on_text(ws, payload, arrival_ns)` gets every text frame."""

    def __init__(self, path: str, host: str, on_text: TextHandler) -> None:
        self.path, self.host, self.on_text = path, host, on_text
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.pings = 0  # server pings answered
        self.tag: object = None  # free for the user (e.g. the session id)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buf += data
        if not self.upgraded.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:end]).split(b"\r\n", 1)[0]
            del self.buf[:end + 4]
            if b" 101 " not in status:
                self.upgraded.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded.set_result(None)
        self._frames(now)

    def _frames(self, now: int) -> None:
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos:pos + n])
            del buf[:pos + n]
            opcode = b0 & 0x0F
            if opcode == 1:
                self.on_text(self, payload, now)
            elif opcode == 9 and self.transport is not None:
                self.pings += 1
                self.transport.write(client_frame(payload, 10))
            elif opcode == 8:
                self.close_code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                if self.transport is not None:
                    self.transport.close()

    def send_text(self, text: str) -> None:
        """Send one text frame."""
        assert self.transport is not None
        self.transport.write(client_frame(text.encode()))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed before the upgrade"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)


async def open_ws(host: str, port: int, path: str, on_text: TextHandler, *,
                  rcvbuf: int | None = None) -> RawWs:
    """Connect and complete the upgrade; `rcvbuf` shrinks the kernel's receive buffer (a slow
    reader then backs up into the server after a few KB instead of a few MB)."""
    loop = asyncio.get_running_loop()
    if rcvbuf is None:
        _, ws = await loop.create_connection(lambda: RawWs(path, f"{host}:{port}", on_text), host, port)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
        except OSError:
            sock.close()
            raise
        _, ws = await loop.create_connection(lambda: RawWs(path, f"{host}:{port}", on_text), sock=sock)
    await ws.upgraded
    return ws
