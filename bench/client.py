"""Minimal clients for measuring: keep-alive HTTP/1.1 and raw Redis PING, so the client costs as
little as possible on a small machine; and the SyncKairos v2 calls every workload needs.

Only the SyncKairos v2 subset is used (create, start, switch, GET, /health): the workloads run
unchanged against any server that speaks it, with or without auth.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from bench.report import BenchError


class RawHttp:
    """One keep-alive HTTP/1.1 connection; just enough protocol for JSON requests."""

    def __init__(self, base_url: str, token: str | None) -> None:
        u = urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""

    async def open(self) -> RawHttp:
        """Connect (again)."""
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body) of one request; a connection the server closed is reopened once."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self._auth}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:  # the server closed the keep-alive connection: reopen, resend once
            await self.open()
            self.writer.write(head + body)
            status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, val = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(val)
            elif name == b"transfer-encoding" and b"chunked" in val.lower():
                chunked = True
        if chunked:
            return status, await self._chunks()
        return status, await self.reader.readexactly(length) if length else b""

    async def _chunks(self) -> bytes:
        data = b""
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return data
            data += chunk[:-2]

    async def timed(self, method: str, path: str, body: bytes = b"") -> tuple[int, float]:
        """(status, milliseconds) of one request."""
        t0 = time.perf_counter()
        status, _ = await self.request(method, path, body)
        return status, (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()


class RawRedis:
    """One Redis connection speaking just PING (TCP or unix socket): the store's round trip."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> RawRedis:
        """Connect (redis://host:port or unix:///path); no AUTH/SELECT needed for PING."""
        u = urlsplit(self.url)
        if u.scheme == "redis+cluster":  # one node's round trip: the first one named
            u = urlsplit("redis://" + u.netloc.split(",")[0])
        if u.scheme == "unix":
            self.reader, self.writer = await asyncio.open_unix_connection(u.path)
        else:
            self.reader, self.writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379)
            if u.password:
                user = u.username or "default"
                self.writer.write(_resp("AUTH", user, u.password))
                await self.reader.readline()
        return self

    async def ping_ms(self) -> float:
        """Milliseconds for one PING -> PONG."""
        t0 = time.perf_counter()
        self.writer.write(b"*1\r\n$4\r\nPING\r\n")
        await self.reader.readline()
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()


def _resp(*parts: str) -> bytes:
    out = f"*{len(parts)}\r\n"
    for p in parts:
        out += f"${len(p.encode())}\r\n{p}\r\n"
    return out.encode()


def session_body(bank_ms: int = 86_400_000, participants: int = 2) -> dict[str, Any]:
    """A SyncKairos v2 CreateSession body: a per_participant session, `bank_ms` per participant."""
    return {"session_id": str(uuid.uuid4()), "sync_mode": "per_participant",
            "participants": [{"participant_id": str(uuid.uuid4()), "total_time_ms": bank_ms}
                             for _ in range(participants)],
            "total_time_ms": min(86_400_000, bank_ms * participants)}


async def start_session(conn: RawHttp, participants: int = 2) -> str:
    """Create and start a session; its id. A refusal is a BenchError naming the answer."""
    body = session_body(participants=participants)
    status, data = await conn.request("POST", "/v1/sessions", json.dumps(body).encode())
    if status not in (200, 201):
        raise BenchError(f"POST /v1/sessions answered {status}: {data[:200].decode(errors='replace')}")
    sid = body["session_id"]
    status, data = await conn.request("POST", f"/v1/sessions/{sid}/start")
    if status != 200:
        raise BenchError(f"POST /v1/sessions/{{id}}/start answered {status}: "
                         f"{data[:200].decode(errors='replace')}")
    return sid


def check_errors(what: str, errors: dict[int, int], total: int, limit: float = 0.01) -> None:
    """Stop the run when more than `limit` of the requests failed (e.g. rate limits left on)."""
    bad = sum(errors.values())
    if total and bad / total > limit:
        hint = "; turn the target's rate limits off" if 429 in errors else ""
        raise BenchError(f"{what}: {bad} of {total} requests failed {dict(errors)}{hint}")
