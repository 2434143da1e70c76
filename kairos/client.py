"""Python client SDK for Kairos (the one module of `kairos/` that does I/O).

    async with KairosClient("http://127.0.0.1:3000", token) as kc:
        session = await kc.create_session({...})     # a typed SessionState
        await kc.start(session.session_id)
        async with kc.subscribe(session.session_id) as sub:
            await sub.sync_clock()                    # offset from several PING/PONG samples
            async for frame in sub:                   # typed Frames: STATE_SYNC, STATE_UPDATE, ...
                ...
        kc.server_now()                               # local clock + measured offset, epoch ms

    with KairosSync("http://127.0.0.1:3000", token) as k:   # the same, blocking, for scripts
        k.start(session_id)

Errors come back as the `kairos.errors` hierarchy (`SessionNotFound`, `RateLimited`, ...), with
`status` set to the HTTP status. Requests are retried on connection errors, 503 and 429 (after
`Retry-After`), every command with the same `Idempotency-Key` (one is made up when none is given),
so a retried switch cannot apply twice. A subscription sends RECONNECT after every (re)connect,
so it always starts from the current state, reconnects by itself (not after 1008 policy closes
or a deleted session), and reports its connection state (`on_state`).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.from_thread
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from kairos.errors import KairosError
from kairos.results import AuditEvent, Frame, ServerTime, SessionState, SwitchResult

Clock = Callable[[], float]
TokenProvider = Callable[[], str | Awaitable[str]]
"""Called for every request and every (re)connect: return a fresh token (e.g. refreshed)."""

_RETRY_STATUSES = {429, 503}
_MAX_WAIT_S = 30.0


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


def _error_from(body: dict[str, Any]) -> KairosError:
    err = KairosError.from_dict(body)
    if "retry_after_seconds" in body:
        err.retry_after = body["retry_after_seconds"]  # type: ignore[attr-defined]
    return err


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        body = None
    if isinstance(body, dict):
        err = _error_from(body)
    else:  # e.g. /ready's unwrapped {"status": "not_ready", "error": "..."}
        err = KairosError(str(body) if body else (resp.text or resp.reason_phrase))
    err.status = resp.status_code
    raise err


def _retry_after_s(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


class KairosClient:
    """Typed async methods for every REST call of docs/api.md, plus `subscribe()` and clock sync.

    `token` is a JWT string or a `TokenProvider`; `retries` is how many times a request is
    re-sent after a connection error, 503 or 429 (0 = never).
    """

    def __init__(self, base_url: str, token: str | TokenProvider | None = None, *,
                 timeout: float = 10.0, clock: Clock = wall_clock_ms, retries: int = 3,
                 backoff_s: float = 0.1, http: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.clock = clock
        self.retries = retries
        self.backoff_s = backoff_s
        self.offset_ms: float | None = None
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def __aenter__(self) -> KairosClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self.http.aclose()

    # ---- plumbing ----

    async def bearer(self) -> str | None:
        """The current token (asks the provider, if one was given)."""
        token = self.token() if callable(self.token) else self.token
        if inspect.isawaitable(token):
            token = await token
        return token

    async def _call(self, method: str, path: str, *, json_body: Any = None, command: bool = False,
                    idempotency_key: str | None = None, params: dict[str, Any] | None = None) -> Any:
        headers: dict[str, str] = {}
        if command:  # the same key on every attempt: a retry returns the first outcome
            headers["Idempotency-Key"] = idempotency_key or f"kairos-py-{uuid.uuid4().hex}"
        for attempt in itertools.count():
            token = await self.bearer()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                resp = await self.http.request(method, path, json=json_body, headers=headers,
                                               params=params)
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
                await anyio.sleep(self._backoff(attempt))
                continue
            if resp.status_code in _RETRY_STATUSES and attempt < self.retries:
                wait = _retry_after_s(resp)
                await anyio.sleep(min(_MAX_WAIT_S, self._backoff(attempt) if wait is None else wait))
                continue
            _raise_for(resp)
            if resp.status_code == 204 or not resp.content:
                return None
            body = resp.json()
            return body["data"] if isinstance(body, dict) and "data" in body else body
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        return min(_MAX_WAIT_S, self.backoff_s * 2**attempt)

    async def _command(self, name: str, session_id: str, key: str | None) -> SessionState:
        return SessionState.from_json(await self._call(
            "POST", f"/v1/sessions/{session_id}/{name}", command=True, idempotency_key=key))

    # ---- open endpoints ----

    async def health(self) -> dict[str, Any]:
        """GET /health."""
        return await self._call("GET", "/health")

    async def ready(self) -> dict[str, Any]:
        """GET /ready (raises a KairosError with status 503 when not ready)."""
        return await self._call("GET", "/ready")

    async def time(self) -> ServerTime:
        """GET /v1/time (also usable for a four-timestamp sample)."""
        return ServerTime.from_json(await self._call("GET", "/v1/time"))

    # ---- sessions ----

    async def create_session(self, body: dict[str, Any], *,
                             idempotency_key: str | None = None) -> SessionState:
        """POST /v1/sessions: the created Session (the caller becomes its owner)."""
        return SessionState.from_json(await self._call(
            "POST", "/v1/sessions", json_body=body, command=True, idempotency_key=idempotency_key))

    async def get_session(self, session_id: str) -> SessionState:
        """GET /v1/sessions/{id}: the Session with live times."""
        return SessionState.from_json(await self._call("GET", f"/v1/sessions/{session_id}"))

    async def start(self, session_id: str, *, idempotency_key: str | None = None) -> SessionState:
        """POST /v1/sessions/{id}/start."""
        return await self._command("start", session_id, idempotency_key)

    async def switch(self, session_id: str, next_participant_id: str | None = None, *,
                     expected_active_participant_id: str | None = None,
                     idempotency_key: str | None = None) -> SwitchResult:
        """POST /v1/sessions/{id}/switch: the SwitchResult."""
        body = {k: v for k, v in (("next_participant_id", next_participant_id),
                                  ("expected_active_participant_id", expected_active_participant_id)) if v}
        return SwitchResult.from_json(await self._call(
            "POST", f"/v1/sessions/{session_id}/switch", json_body=body, command=True,
            idempotency_key=idempotency_key))

    async def pause(self, session_id: str, *, idempotency_key: str | None = None) -> SessionState:
        """POST /v1/sessions/{id}/pause."""
        return await self._command("pause", session_id, idempotency_key)

    async def resume(self, session_id: str, *, idempotency_key: str | None = None) -> SessionState:
        """POST /v1/sessions/{id}/resume."""
        return await self._command("resume", session_id, idempotency_key)

    async def complete(self, session_id: str, *, idempotency_key: str | None = None) -> SessionState:
        """POST /v1/sessions/{id}/complete."""
        return await self._command("complete", session_id, idempotency_key)

    async def cancel(self, session_id: str, *, idempotency_key: str | None = None) -> SessionState:
        """POST /v1/sessions/{id}/cancel."""
        return await self._command("cancel", session_id, idempotency_key)

    async def delete_session(self, session_id: str, *, idempotency_key: str | None = None) -> None:
        """DELETE /v1/sessions/{id} (idempotent)."""
        await self._call("DELETE", f"/v1/sessions/{session_id}", command=True,
                         idempotency_key=idempotency_key)

    async def events(self, session_id: str, after_version: int | None = None) -> list[AuditEvent]:
        """GET /v1/sessions/{id}/events: audit history, oldest first."""
        params = {"after_version": after_version} if after_version is not None else None
        rows = await self._call("GET", f"/v1/sessions/{session_id}/events", params=params)
        return [AuditEvent.from_json(r) for r in rows]

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

    def subscribe(self, session_id: str, *, reconnect: bool = True,
                  on_state: Callable[[ConnectionState], None] | None = None) -> Subscription:
        """A WebSocket subscription to one session (use as `async with`)."""
        ws_base = "ws" + self.base_url.removeprefix("http")
        return Subscription(self, f"{ws_base}/ws?sessionId={session_id}", reconnect=reconnect,
                            on_state=on_state)

    async def sync_clock_http(self, samples: int = 8) -> ClockSample:
        """Estimate the clock offset from several `GET /v1/time` samples (no socket needed)."""
        found = []
        for _ in range(max(1, samples)):
            t1 = self.clock()
            t = await self.time()
            found.append(ClockSample.from_timestamps(t1, t.server_receive_ms, t.server_send_ms,
                                                     self.clock()))
        best = best_sample(found)
        self.offset_ms = best.offset_ms
        return best

    def server_now(self) -> float:
        """The server's clock now (epoch ms), from the local clock and the measured offset."""
        if self.offset_ms is None:
            raise RuntimeError("clock not synchronised yet: call sync_clock() first")
        return self.clock() + self.offset_ms


class SubscriptionClosed(Exception):
    """The server ended the subscription for good (policy close, session deleted)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """A subscription's connection changed: `connecting`, `connected`, `reconnecting` (with the
    close `code`/`reason` that caused it) or `closed` (for good)."""

    state: Literal["connecting", "connected", "reconnecting", "closed"]
    code: int | None = None
    reason: str = ""


_FINAL_CODES = {1008, 1000}  # policy (bad id/token/forbidden) and "Session deleted": no reconnect
_COMMANDS = ("SWITCH", "START", "PAUSE", "RESUME", "COMPLETE", "CANCEL")


class Subscription:
    """One session's WebSocket: typed frames as an async iterator, commands, clock sync."""

    def __init__(self, client: KairosClient, url: str, *, reconnect: bool = True,
                 on_state: Callable[[ConnectionState], None] | None = None) -> None:
        self.client = client
        self.url = url
        self.reconnect = reconnect
        self.on_state = on_state
        self.state = ConnectionState("connecting")
        self.last_version: int | None = None
        self.connects = 0
        self._ws: ClientConnection | None = None
        self._connected = anyio.Event()
        self._send, self._recv = anyio.create_memory_object_stream[Frame](10_000)
        self._pending: dict[str, Any] = {}  # request_id / ping key -> [Event, result]
        self._ids = itertools.count(1)
        self._tg: anyio.abc.TaskGroup | None = None
        self.closed: SubscriptionClosed | None = None
        self._closing = False

    def _set_state(self, state: ConnectionState) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state)

    async def __aenter__(self) -> Subscription:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._set_state(ConnectionState("connecting"))
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
        token = await self.client.bearer()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._ws = await connect(self.url, additional_headers=headers, compression=None,
                                 max_size=2**24, open_timeout=10)
        self.connects += 1
        first = json.loads(await self._ws.recv())
        if first.get("type") != "CONNECTED":
            raise SubscriptionClosed(None, f"unexpected first frame {first.get('type')}")
        await self._send.send(Frame.from_json(first))
        # Start from the current state on every connect: STATE_SYNC (or ERROR when the session
        # does not exist yet; its creation then arrives as a STATE_UPDATE).
        await self._ws.send(json.dumps({"type": "RECONNECT", "last_version": self.last_version}))
        self._set_state(ConnectionState("connected"))
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
                self._set_state(ConnectionState("closed", code, reason))
                await self._send.send(Frame("CLOSED", code=code, reason=reason,
                                            raw={"type": "CLOSED", "code": code, "reason": reason}))
                self._send.close()
                return
            self._connected = anyio.Event()
            self._fail_pending(ConnectionError("connection lost"))
            self._set_state(ConnectionState("reconnecting", code, reason))
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
            await self._send.send(Frame.from_json(frame))

    def _fail_pending(self, exc: Exception) -> None:
        for slot in self._pending.values():
            slot[1] = exc
            slot[0].set()
        self._pending.clear()

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._recv.__aiter__()

    async def next_frame(self, *types: str, wait_s: float = 10.0) -> Frame:
        """The next frame (of one of `types`, if given), skipping others; TimeoutError if none."""
        with anyio.fail_after(wait_s):
            async for frame in self._recv:
                if not types or frame.type in types:
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

    async def command(self, kind: str, *, wait_s: float = 10.0,
                      **fields: Any) -> SessionState | SwitchResult:
        """Send SWITCH/START/PAUSE/RESUME/COMPLETE/CANCEL; returns the ACK data (a SwitchResult
        for SWITCH, else the Session), raises the ERROR as a KairosError."""
        request_id = fields.pop("request_id", None) or f"r-{next(self._ids)}"
        frame = await self._roundtrip(request_id, {"type": kind, "request_id": request_id, **fields}, wait_s)
        if frame.get("type") == "ERROR":
            raise _error_from(frame)
        data = frame["data"]
        return SwitchResult.from_json(data) if kind == "SWITCH" else SessionState.from_json(data)

    async def switch(self, next_participant_id: str | None = None, **fields: Any) -> SwitchResult:
        """SWITCH over the socket; returns the SwitchResult."""
        if next_participant_id:
            fields["next_participant_id"] = next_participant_id
        result = await self.command("SWITCH", **fields)
        assert isinstance(result, SwitchResult)
        return result

    async def cancel(self, **fields: Any) -> SessionState:
        """CANCEL over the socket; returns the cancelled Session."""
        result = await self.command("CANCEL", **fields)
        assert isinstance(result, SessionState)
        return result

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


class KairosSync:
    """A blocking facade over `KairosClient` for scripts and tests (runs it on a private event
    loop thread); the same methods, without `await`."""

    def __init__(self, base_url: str, token: str | TokenProvider | None = None,
                 **options: Any) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self.client: KairosClient = self._portal.call(self._make, base_url, token, options)

    @staticmethod
    async def _make(base_url: str, token: str | TokenProvider | None,
                    options: dict[str, Any]) -> KairosClient:
        return KairosClient(base_url, token, **options)

    def __enter__(self) -> KairosSync:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the client and stop its event loop thread."""
        try:
            self._portal.call(self.client.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(lambda: fn(*args, **kwargs))

    def health(self) -> dict[str, Any]:
        """GET /health."""
        return self._run(self.client.health)

    def time(self) -> ServerTime:
        """GET /v1/time."""
        return self._run(self.client.time)

    def create_session(self, body: dict[str, Any], **kw: Any) -> SessionState:
        """POST /v1/sessions."""
        return self._run(self.client.create_session, body, **kw)

    def get_session(self, session_id: str) -> SessionState:
        """GET /v1/sessions/{id}."""
        return self._run(self.client.get_session, session_id)

    def start(self, session_id: str, **kw: Any) -> SessionState:
        """POST /v1/sessions/{id}/start."""
        return self._run(self.client.start, session_id, **kw)

    def switch(self, session_id: str, next_participant_id: str | None = None,
               **kw: Any) -> SwitchResult:
        """POST /v1/sessions/{id}/switch."""
        return self._run(self.client.switch, session_id, next_participant_id, **kw)

    def pause(self, session_id: str, **kw: Any) -> SessionState:
        """POST /v1/sessions/{id}/pause."""
        return self._run(self.client.pause, session_id, **kw)

    def resume(self, session_id: str, **kw: Any) -> SessionState:
        """POST /v1/sessions/{id}/resume."""
        return self._run(self.client.resume, session_id, **kw)

    def complete(self, session_id: str, **kw: Any) -> SessionState:
        """POST /v1/sessions/{id}/complete."""
        return self._run(self.client.complete, session_id, **kw)

    def cancel(self, session_id: str, **kw: Any) -> SessionState:
        """POST /v1/sessions/{id}/cancel."""
        return self._run(self.client.cancel, session_id, **kw)

    def delete_session(self, session_id: str, **kw: Any) -> None:
        """DELETE /v1/sessions/{id}."""
        self._run(self.client.delete_session, session_id, **kw)

    def events(self, session_id: str, after_version: int | None = None) -> list[AuditEvent]:
        """GET /v1/sessions/{id}/events."""
        return self._run(self.client.events, session_id, after_version)

    def sync_clock(self, samples: int = 8) -> ClockSample:
        """Measure the clock offset over HTTP (`GET /v1/time`)."""
        return self._run(self.client.sync_clock_http, samples)

    def server_now(self) -> float:
        """The server's clock now (epoch ms)."""
        return self.client.server_now()
