"""Client loops for failover and drain measurements: a switch loop that retries with the same
Idempotency-Key, and a WebSocket watcher that reconnects elsewhere and re-syncs (the failover
bench and the failover tests both drive servers with them)."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.client import session_body
from bench.waiting import eventually as wait_until

__all__ = ["Switcher", "Watcher", "create_running", "wait_until"]


async def create_running(http: httpx.AsyncClient, url: str, bank_ms: int = 300_000) -> dict[str, Any]:
    """Create and start a session through `url` (that instance claims it); the started state."""
    body = session_body(bank_ms)
    r = await http.post(f"{url}/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    r = await http.post(f"{url}/v1/sessions/{body['session_id']}/start")
    assert r.status_code == 200, r.text
    return r.json()["data"]


class Switcher:
    """Loops switches of one session through `urls` (round robin). A failed attempt is retried
    with the same Idempotency-Key until acknowledged, so each key counts once."""

    def __init__(self, http: httpx.AsyncClient, sid: str, urls: list[str]) -> None:
        self.http, self.sid, self.urls = http, sid, urls
        self.acked: list[tuple[float, int]] = []  # (monotonic time of the 200, version)
        self.last: dict[str, Any] = {}  # the state in the last 200
        self.failures: list[str] = []  # every non-200 answer or transport error, in order
        self.stopped = anyio.Event()
        self.done = anyio.Event()
        self._n = 0

    async def stop(self, within: float = 15) -> None:
        """Let the key in hand be acknowledged, then stop."""
        self.stopped.set()
        with anyio.fail_after(within):
            await self.done.wait()

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            self.done.set()

    async def _loop(self) -> None:
        i = 0
        while not self.stopped.is_set():
            key = f"{self.sid[:8]}-{self._n}"
            while True:
                url = self.urls[i % len(self.urls)]
                i += 1
                try:
                    r = await self.http.post(f"{url}/v1/sessions/{self.sid}/switch",
                                             headers={"Idempotency-Key": key})
                except httpx.HTTPError as e:
                    self.failures.append(f"{url}: {e!r}")
                    continue
                if r.status_code == 200:
                    self.last = r.json()["data"]
                    self.acked.append((time.monotonic(), self.last["version"]))
                    break
                self.failures.append(f"{url}: {r.status_code} {r.text[:200]}")
            self._n += 1

    def acks_after(self, t: float) -> int:
        return sum(1 for at, _ in self.acked if at > t)

    def longest_gap(self) -> float:
        times = [at for at, _ in self.acked]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class Watcher:
    """A WebSocket client of one session. On a close it reconnects to the next URL of `urls` and
    sends RECONNECT (the server answers STATE_SYNC), whether or not it saw a state before; a
    version gap also asks for a re-sync."""

    def __init__(self, sid: str, urls: list[str], token: str) -> None:
        self.sid, self.urls, self.token = sid, urls, token
        self.frames: list[tuple[str, dict[str, Any]]] = []  # (url, frame) in arrival order
        self.closes: list[tuple[str, int | None]] = []  # (url, close code)
        self.versions: list[int] = []  # state versions seen, in arrival order
        self.connected = anyio.Event()
        self.stopped = False
        self.url: str | None = None  # where the socket is connected now (None between sockets)

    @property
    def last_version(self) -> int | None:
        return self.versions[-1] if self.versions else None

    async def run(self) -> None:
        i = 0
        while not self.stopped:
            url = self.urls[i % len(self.urls)]
            try:
                async with connect(f"{url}?sessionId={self.sid}&token={self.token}",
                                   open_timeout=5, compression=None) as ws:
                    first = json.loads(await ws.recv())
                    if first.get("type") != "CONNECTED":  # e.g. a draining instance refusing us
                        raise ConnectionClosed(None, None)
                    if self.closes:  # a reconnect: ask for the state (changes in between are lost)
                        await ws.send(json.dumps({"type": "RECONNECT", "last_version": self.last_version}))
                    self.connected.set()
                    self.url = url
                    async for raw in ws:
                        frame = json.loads(raw)
                        self.frames.append((url, frame))
                        await self._on_frame(ws, frame)
                    self.closes.append((url, ws.close_code))
            except (ConnectionClosed, OSError, TimeoutError) as e:
                code = getattr(getattr(e, "rcvd", None), "code", None)
                self.closes.append((url, code))
            self.url = None
            i += 1

    async def _on_frame(self, ws: Any, frame: dict[str, Any]) -> None:
        version = (frame.get("state") or {}).get("version")
        if not isinstance(version, int) or frame.get("type") not in ("STATE_UPDATE", "STATE_SYNC"):
            return
        last = self.last_version
        if frame["type"] == "STATE_UPDATE" and last is not None and version > last + 1:
            await ws.send(json.dumps({"type": "RECONNECT", "last_version": last}))
        self.versions.append(version)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for _, f in self.frames if f.get("type") == kind]
