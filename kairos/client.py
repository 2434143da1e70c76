"""Async client SDK for Kairos (the one module of `kairos/` that does I/O).

    async with KairosClient("http://127.0.0.1:3000", token) as kc:
        await kc.create_session({...})
        await kc.start(session_id)
        async with kc.subscribe(session_id) as sub:
            await sub.sync_clock()            # offset from several PING/PONG samples
            async for frame in sub:           # STATE_UPDATE, TIME_WARNING, TIME_EXPIRED, ...
                ...
        kc.server_now()                       # local clock + measured offset, epoch ms

Errors come back as the `kairos.errors` hierarchy (`SessionNotFound`, `RateLimited`, ...), with
`status` set to the HTTP status. The subscription reconnects by itself (not after 1008 policy
closes or a deleted session) and asks for `STATE_SYNC` after every reconnect and on version gaps.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from kairos.errors import KairosError

Clock = Callable[[], float]


def wall_clock_ms() -> float:
    """The local clock in epoch milliseconds (float, sub-ms resolution)."""
    return time.time_ns() / 1e6


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One PING/PONG exchange (NTP): offset = server - client, delay = round trip minus server time."""

    offset_ms: float
    delay_ms: float

    @staticmethod
    def from_timestamps(t1: float, t2: float, t3: float, t4: float) -> ClockSample:
        """The NTP formulas for one exchange (t1 send, t2/t3 server, t4 receive)."""
        return ClockSample(((t2 - t1) + (t3 - t4)) / 2, (t4 - t1) - (t3 - t2))


def best_sample(samples: list[ClockSample]) -> ClockSample:
    """The minimum-delay sample: the least queueing, so the least asymmetric error."""
    return min(samples, key=lambda s: s.delay_ms)


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        body = None
    if isinstance(body, dict):
        err = KairosError.from_dict(body)
        if "retry_after_seconds" in body:
            err.retry_after = body["retry_after_seconds"]  # type: ignore[attr-defined]
    else:  # e.g. /ready's unwrapped {"status": "not_ready", "error": "..."}
        err = KairosError(str(body) if body else (resp.text or resp.reason_phrase))
    err.status = resp.status_code
    raise err


class KairosClient:
    """Typed async methods for every REST call of docs/api.md, plus `subscribe()` and clock sync."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 10.0,
                 clock: Clock = wall_clock_ms, http: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.clock = clock
        self.offset_ms: float | None = None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = http or httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> KairosClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self.http.aclose()

    # ---- plumbing ----

    async def _call(self, method: str, path: str, *, json_body: Any = None,
                    idempotency_key: str | None = None, params: dict[str, Any] | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        resp = await self.http.request(method, path, json=json_body, headers=headers, params=params)
        _raise_for(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        body = resp.json()
        return body["data"] if isinstance(body, dict) and "data" in body else body

    # ---- open endpoints ----

    async def health(self) -> dict[str, Any]:
        """GET /health."""
        return await self._call("GET", "/health")

    async def ready(self) -> dict[str, Any]:
        """GET /ready (raises a KairosError with status 503 when not ready)."""
        return await self._call("GET", "/ready")

    async def time(self) -> dict[str, Any]:
        """GET /v1/time (also usable for a four-timestamp sample)."""
        return await self._call("GET", "/v1/time")

    # ---- sessions ----

    async def create_session(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/sessions: the created Session."""
        return await self._call("POST", "/v1/sessions", json_body=body, idempotency_key=idempotency_key)

    async def get_session(self, session_id: str) -> dict[str, Any]:
        """GET /v1/sessions/{id}: the Session with live times."""
        return await self._call("GET", f"/v1/sessions/{session_id}")

    async def start(self, session_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/sessions/{id}/start."""
        return await self._call("POST", f"/v1/sessions/{session_id}/start", idempotency_key=idempotency_key)

    async def switch(self, session_id: str, next_participant_id: str | None = None, *,
                     expected_active_participant_id: str | None = None,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/sessions/{id}/switch: the SwitchResult."""
        body = {k: v for k, v in (("next_participant_id", next_participant_id),
                                  ("expected_active_participant_id", expected_active_participant_id)) if v}
        return await self._call("POST", f"/v1/sessions/{session_id}/switch", json_body=body,
                                idempotency_key=idempotency_key)

    async def pause(self, session_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/sessions/{id}/pause."""
        return await self._call("POST", f"/v1/sessions/{session_id}/pause", idempotency_key=idempotency_key)

    async def resume(self, session_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/sessions/{id}/resume."""
        return await self._call("POST", f"/v1/sessions/{session_id}/resume", idempotency_key=idempotency_key)

    async def complete(self, session_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/sessions/{id}/complete."""
        return await self._call("POST", f"/v1/sessions/{session_id}/complete", idempotency_key=idempotency_key)

    async def delete_session(self, session_id: str) -> None:
        """DELETE /v1/sessions/{id} (idempotent)."""
        await self._call("DELETE", f"/v1/sessions/{session_id}")

    async def events(self, session_id: str, after_version: int | None = None) -> list[dict[str, Any]]:
        """GET /v1/sessions/{id}/events: audit history, oldest first."""
        params = {"after_version": after_version} if after_version is not None else None
        return await self._call("GET", f"/v1/sessions/{session_id}/events", params=params)

    # ---- devices and admin ----

    async def register_device(self, token: str, platform: str) -> dict[str, Any]:
        """POST /v1/devices: register a push token for the caller."""
        return await self._call("POST", "/v1/devices", json_body={"token": token, "platform": platform})

    async def delete_device(self, token: str) -> None:
        """DELETE /v1/devices/{token}."""
        await self._call("DELETE", f"/v1/devices/{token}")

    async def drain(self) -> dict[str, Any]:
        """POST /admin/drain (admin)."""
        return await self._call("POST", "/admin/drain")

    async def instances(self) -> list[dict[str, Any]]:
        """GET /admin/instances (admin)."""
        return await self._call("GET", "/admin/instances")

    # ---- WebSocket and clock ----

    def subscribe(self, session_id: str, *, reconnect: bool = True) -> Subscription:
        """A WebSocket subscription to one session (use as `async with`)."""
        ws_base = "ws" + self.base_url.removeprefix("http")
        return Subscription(self, f"{ws_base}/ws?sessionId={session_id}", reconnect=reconnect)

    def server_now(self) -> float:
        """The server's clock now (epoch ms), from the local clock and the measured offset."""
        if self.offset_ms is None:
            raise RuntimeError("clock not synchronised yet: call Subscription.sync_clock() first")
        return self.clock() + self.offset_ms


class SubscriptionClosed(Exception):
    """The server ended the subscription for good (policy close, session deleted)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


_FINAL_CODES = {1008, 1000}  # policy (bad id/token/forbidden) and "Session deleted": no reconnect


class Subscription:
    """One session's WebSocket: frames as an async iterator, commands, PING/PONG clock sync."""

    def __init__(self, client: KairosClient, url: str, *, reconnect: bool = True) -> None:
        self.client = client
        self.url = url
        self.reconnect = reconnect
        self.last_version: int | None = None
        self.connects = 0
        self._ws: ClientConnection | None = None
        self._connected = anyio.Event()
        self._send, self._recv = anyio.create_memory_object_stream[dict[str, Any]](10_000)
        self._pending: dict[str, Any] = {}  # request_id / ping key -> [Event, result]
        self._ids = itertools.count(1)
        self._tg: anyio.abc.TaskGroup | None = None
        self.closed: SubscriptionClosed | None = None
        self._closing = False

    async def __aenter__(self) -> Subscription:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._open()
        self._tg.start_soon(self._run)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._tg is not None
        self._closing = True
        if self._ws is not None:
            with anyio.move_on_after(2, shield=True):
                await self._ws.close()
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(et, e, tb)

    async def _open(self) -> None:
        headers = {"Authorization": f"Bearer {self.client.token}"} if self.client.token else None
        self._ws = await connect(self.url, additional_headers=headers, compression=None,
                                 max_size=2**24, open_timeout=10)
        self.connects += 1
        first = json.loads(await self._ws.recv())
        if first.get("type") != "CONNECTED":
            raise SubscriptionClosed(None, f"unexpected first frame {first.get('type')}")
        await self._send.send(first)
        if self.connects > 1:
            await self._ws.send(json.dumps({"type": "RECONNECT", "last_version": self.last_version}))
        self._connected.set()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            ws = self._ws
            assert ws is not None
            try:
                await self._read(ws)  # returns when the server closed normally
                code, reason = ws.close_code, ws.close_reason or ""
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")
            if self._closing or not self.reconnect or code in _FINAL_CODES:
                self.closed = SubscriptionClosed(code, reason)
                self._fail_pending(self.closed)
                await self._send.send({"type": "CLOSED", "code": code, "reason": reason})
                self._send.close()
                return
            self._connected = anyio.Event()
            self._fail_pending(ConnectionError("connection lost"))
            while True:  # reconnect with capped exponential backoff
                await anyio.sleep(delay)
                try:
                    await self._open()
                    delay = 0.05
                    break
                except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, TimeoutError):
                    delay = min(delay * 2, 2.0)

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            t4 = self.client.clock()
            try:
                frame = json.loads(raw)
            except ValueError:
                continue
            kind = frame.get("type")
            if kind == "PONG":
                slot = self._pending.pop(f"ping:{frame.get('client_time')}", None)
                if slot is not None:
                    slot[1] = (frame, t4)
                    slot[0].set()
                continue
            if kind in ("ACK", "ERROR") and frame.get("request_id") in self._pending:
                slot = self._pending.pop(frame["request_id"])
                slot[1] = frame
                slot[0].set()
                continue
            if kind in ("STATE_UPDATE", "STATE_SYNC", "TIME_EXPIRED"):
                version = (frame.get("state") or {}).get("version")
                if isinstance(version, int):
                    if (kind == "STATE_UPDATE" and self.last_version is not None
                            and version > self.last_version + 1):
                        # A gap: we missed an update; ask for the full state.
                        await ws.send(json.dumps({"type": "RECONNECT", "last_version": self.last_version}))
                    if self.last_version is None or version > self.last_version or kind == "STATE_SYNC":
                        self.last_version = version
            await self._send.send(frame)

    def _fail_pending(self, exc: Exception) -> None:
        for slot in self._pending.values():
            slot[1] = exc
            slot[0].set()
        self._pending.clear()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._recv.__aiter__()

    async def next_frame(self, *types: str, wait_s: float = 10.0) -> dict[str, Any]:
        """The next frame (of one of `types`, if given), skipping others; TimeoutError if none."""
        with anyio.fail_after(wait_s):
            async for frame in self._recv:
                if not types or frame.get("type") in types:
                    return frame
        raise SubscriptionClosed(None, "subscription ended")

    async def _roundtrip(self, key: str, payload: dict[str, Any], wait_s: float) -> Any:
        await self._connected.wait()
        slot: list[Any] = [anyio.Event(), None]
        self._pending[key] = slot
        assert self._ws is not None
        await self._ws.send(json.dumps(payload))
        with anyio.fail_after(wait_s):
            await slot[0].wait()
        if isinstance(slot[1], Exception):
            raise slot[1]
        return slot[1]

    async def command(self, kind: str, *, wait_s: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send SWITCH/PAUSE/RESUME/START/COMPLETE; returns the ACK `data`, raises the ERROR."""
        request_id = fields.pop("request_id", None) or f"r-{next(self._ids)}"
        frame = await self._roundtrip(request_id, {"type": kind, "request_id": request_id, **fields}, wait_s)
        if frame.get("type") == "ERROR":
            err = KairosError.from_dict(frame)
            if "retry_after_seconds" in frame:
                err.retry_after = frame["retry_after_seconds"]  # type: ignore[attr-defined]
            raise err
        return frame["data"]

    async def switch(self, next_participant_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """SWITCH over the socket; returns the ACK data."""
        if next_participant_id:
            fields["next_participant_id"] = next_participant_id
        return await self.command("SWITCH", **fields)

    async def ping(self, wait_s: float = 5.0) -> ClockSample:
        """One PING/PONG exchange -> a clock sample."""
        t1 = self.client.clock()
        # The echoed client_time doubles as the key matching PONG to PING.
        client_time = round(t1, 3)
        pong, t4 = await self._roundtrip(f"ping:{client_time}", {"type": "PING", "client_time": client_time}, wait_s)
        return ClockSample.from_timestamps(t1, pong["server_receive_ms"], pong["server_send_ms"], t4)

    async def sync_clock(self, samples: int = 8) -> ClockSample:
        """Estimate the offset from several PINGs; keeps the minimum-delay sample."""
        best = best_sample([await self.ping() for _ in range(max(1, samples))])
        if not math.isfinite(best.offset_ms):
            raise ValueError("bad clock sample")
        self.client.offset_ms = best.offset_ms
        return best

    async def request_sync(self) -> None:
        """Ask for a full `STATE_SYNC` now."""
        await self._connected.wait()
        assert self._ws is not None
        await self._ws.send(json.dumps({"type": "RECONNECT", "last_version": self.last_version}))
