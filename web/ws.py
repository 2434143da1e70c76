"""WebSocket `/ws?sessionId=…`: subscribe to a session, receive its changes, send commands.

Each instance relays a session's update messages (from `actors.fanout`) to its sockets. A
`Relay` per watched session turns one update message into frames ONCE — serialised once, framed
once (server frames are unmasked, so the bytes are the same for every socket) — and writes them
to each local socket's transport in one pass: no per-socket task or await on that path. A socket
whose unsent bytes stay above its bound (a client that stopped reading) is dropped with 1013, so
a slow client never delays the others.
"""

from __future__ import annotations

import gc
import json
import re
import time
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from quart import Quart, websocket

from kairos import commands as C
from kairos import wire
from kairos.errors import KairosError, RateLimited, SessionNotFound, UnknownCommand, ValidationError
from web import auth as A
from web import errors as W
from web import metrics
from web.hypercorn_ws import RawSocket, text_frame
from web.schemas import UUID_PATTERN, unstorable

if TYPE_CHECKING:
    from web.app import Services

log = structlog.get_logger("kairos.ws")

_UUID = re.compile(UUID_PATTERN)
_COMMANDS = {"SWITCH", "PAUSE", "RESUME", "START", "COMPLETE", "CANCEL"}
_FREEZE_EVERY = 1000  # socket joins between two gc.freeze() calls
# KAIROS_WS_SEND_QUEUE counts frames; unsent bytes are what a transport can measure, so the bound
# is that many frames of this size (256 KB by default, on top of what the kernel buffers).
_BYTES_PER_FRAME = 1024


class Frames:
    """Frames to send, made once per update: their texts and, framed, their wire bytes; the
    session version they show (0: none) and whether they are a STATE_SYNC."""

    __slots__ = ("texts", "data", "version", "sync", "events")

    def __init__(self, texts: list[str], version: int = 0, *, sync: bool = False, events: int = 0) -> None:
        self.texts = texts
        self.data = b"".join(text_frame(t.encode()) for t in texts)
        self.version = version
        self.sync = sync
        # The change's TIME_WARNING / TIME_EXPIRED alone (the first `events` texts): what a socket
        # still gets when a STATE_SYNC of this very version got to it before the update.
        self.events = Frames(texts[:events]) if events else None


class Socket:
    """One connected client: frames are written straight to its transport (`RawSocket`), or —
    when it has none (an HTTP/2 WebSocket) — queued for a sender task; closable from elsewhere."""

    def __init__(self, queue_size: int, raw: RawSocket | None = None) -> None:
        self.raw = raw
        self.limit = queue_size * _BYTES_PER_FRAME
        # Frames that arrive between the subscription and the CONNECTED frame wait here.
        self.held: list[bytes] | None = [] if raw is not None else None
        self.queue: anyio.abc.ObjectSendStream[str] | None = None
        self.recv_stream: anyio.abc.ObjectReceiveStream[str] | None = None
        if raw is None:
            self.queue, self.recv_stream = anyio.create_memory_object_stream[str](queue_size)
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = anyio.Event()  # someone asked to close this socket
        self.flushed = anyio.Event()  # everything queued before the close went out
        # The newest session version sent (or held) for this socket: versions never go back.
        self.version = 0

    def send(self, frames: Frames) -> bool:
        """Write (or queue) frames without waiting; False (and the socket is marked for closing
        with 1013) when the client has let too much pile up. A state older than the one this
        socket has (a pub/sub update overtaken by a STATE_SYNC) is skipped; so is the same
        version again, except a STATE_SYNC and the change's warning/expiry frames."""
        if self.close_code is not None:
            return False
        version = frames.version
        if version > self.version:
            self.version = version
        elif version and not (frames.sync and version == self.version):
            if version < self.version or frames.events is None:
                return True
            frames = frames.events
        raw = self.raw
        if self.held is not None:
            if len(self.held) >= self.limit // _BYTES_PER_FRAME:
                return self._too_slow()
            self.held.append(frames.data)
            return True
        if raw is not None:
            if not raw.writable():
                return False
            if raw.buffered() > self.limit:
                return self._too_slow()
            raw.write(frames.data)
            return True
        assert self.queue is not None
        try:
            for text in frames.texts:
                self.queue.send_nowait(text)
            return True
        except anyio.WouldBlock:
            return self._too_slow()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False

    def connected(self) -> None:
        """CONNECTED has been written: from now on frames go straight out (held ones first)."""
        held, self.held = self.held, None
        if held and self.raw is not None and self.raw.writable():
            self.raw.write(b"".join(held))

    def _too_slow(self) -> bool:
        metrics.WS_DROPPED.inc()
        self.close(1013, "Client too slow", flush=False)
        return False

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Ask to close; with `flush` the frames already queued (e.g. SESSION_DELETED) go first."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if self.queue is not None:
            self.queue.close()
        if self.raw is not None or not flush:
            self.flushed.set()  # raw writes are in the transport already
        self.closing.set()


class GatedSocket(Socket):
    """A socket opened before its session existed: its frames flow once the first state shows
    that the caller may read the session; otherwise it is closed with 1008 "Forbidden"."""

    def __init__(self, queue_size: int, caller: A.Caller, raw: RawSocket | None = None) -> None:
        super().__init__(queue_size, raw)
        self.caller = caller
        self.allowed = False

    def send(self, frames: Frames) -> bool:
        """Send frames once the caller is known to be allowed to read the session."""
        if not self.allowed:
            state = json.loads(frames.texts[-1]).get("state")
            if state is None:
                return True  # nothing to judge by yet (and nothing worth showing)
            try:
                A.require_read(self.caller, wire.session_from_json(state))
            except KairosError:
                self.close(1008, "Forbidden", flush=False)
                return False
            self.allowed = True
        return super().send(frames)


class Relay:
    """The sockets watching one session on this instance."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.sockets: set[Socket] = set()
        self.version = 0  # the newest version relayed here

    def __call__(self, message: bytes) -> None:
        """Fan-out watcher: frame the update once, write the same bytes to every socket."""
        try:
            texts, deleted, version = update_frames(message)
        except (ValueError, KeyError, TypeError):
            log.warning("undecodable update message", session_id=self.session_id)
            return
        metrics.WS_MESSAGES.labels("out", "STATE_UPDATE").inc(len(self.sockets))
        self.version = max(self.version, version)
        # a deletion always goes out; an update's extra frames precede its STATE_UPDATE
        self.send(Frames(texts) if deleted else Frames(texts, version, events=len(texts) - 1))
        if deleted:
            for sock in self.sockets:
                sock.close(1000, "Session deleted")

    def send(self, frames: Frames) -> None:
        """One pass over the sockets, no await: `Socket.send` never blocks."""
        for sock in self.sockets:
            sock.send(frames)


def update_frames(message: bytes) -> tuple[list[str], bool, int]:
    """The WS frames for one update message (kairos.wire format), whether it was a delete, and
    its version."""
    msg = json.loads(message)
    version = msg.get("version") or 0
    sid = msg["session_id"]
    ts = msg["server_time_ms"]
    state = msg.get("state")
    frames: list[str] = []
    for ev in msg.get("events", ()):
        if ev.get("type") == "time_warning":
            remaining = (ev.get("data") or {}).get("time_remaining_ms")
            frames.append(json.dumps({"type": "TIME_WARNING", "sessionId": sid, "timestamp": ts,
                                      "participant_id": ev.get("participant_id"),
                                      "remaining_ms": remaining}))
    expired = msg.get("expired_participant_id")
    if expired and state is not None:
        frames.append(json.dumps({"type": "TIME_EXPIRED", "sessionId": sid, "timestamp": ts,
                                  "participant_id": expired, "state": state}))
    if state is None:
        frames.append(json.dumps({"type": "SESSION_DELETED", "sessionId": sid, "timestamp": ts}))
        return frames, True, version
    frames.append(json.dumps({"type": "STATE_UPDATE", "sessionId": sid, "timestamp": ts, "state": state}))
    return frames, False, version


class Relays:
    """All relays of this instance; subscribes through the fan-out on a session's first socket."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.relays: dict[str, Relay] = {}
        self.sockets: set[Socket] = set()
        self._joins = 0

    async def join(self, session_id: str, sock: Socket) -> None:
        """Add a socket to its session's relay; returns once the session is subscribed."""
        self.sockets.add(sock)
        self._joins += 1
        if self._joins % _FREEZE_EVERY == 0:
            # With thousands of sockets a full collection paused us 0.5-1.3 s; moving the settled
            # connection objects out of the collected generations keeps pauses short.
            gc.freeze()
        relay = self.relays.get(session_id)
        if relay is None:
            relay = self.relays[session_id] = Relay(session_id)
        relay.sockets.add(sock)
        # Every joiner waits for the subscription (at once when it is there): the first
        # joiner's may still be under way, or have been cut short when its client went away.
        await self.svc.fanout.watch(session_id, relay)

    async def leave(self, session_id: str, sock: Socket) -> None:
        """Remove a socket (unsubscribes after the last one)."""
        self.sockets.discard(sock)
        relay = self.relays.get(session_id)
        if relay is None:
            return
        relay.sockets.discard(sock)
        if not relay.sockets:
            del self.relays[session_id]
            await self.svc.fanout.unwatch(session_id, relay)

    async def resync(self, session_ids: list[str]) -> None:
        """After a fan-out gap (pub/sub reconnect): a fresh STATE_SYNC to every socket of these
        sessions, or close 1012 so the client reconnects and re-syncs if the state is unreadable."""
        gate = anyio.CapacityLimiter(16)

        async def one(sid: str) -> None:
            async with gate:
                relay = self.relays.get(sid)
                if relay is None:
                    return
                try:
                    state = await self.svc.host.get(sid)
                except Exception as exc:
                    log.warning("re-sync failed; closing the session's sockets", session_id=sid,
                                error=str(exc))
                    for sock in list(relay.sockets):
                        sock.close(1012, "Service restart")
                    return
                if state.version < relay.version:
                    return  # a newer update arrived since the resubscribe: nothing was missed
                # each socket skips it if it already has a newer version (Socket.send)
                relay.send(Frames([state_sync_frame(sid, state, self.svc.clock())], state.version, sync=True))

        async with anyio.create_task_group() as tg:
            for sid in session_ids:
                tg.start_soon(one, sid)

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket (drain: 1012, shutdown: 1001) and wait briefly for them to go."""
        for sock in list(self.sockets):
            sock.close(code, reason)
        with anyio.move_on_after(2):
            while self.sockets:  # noqa: ASYNC110 - bounded by the timeout above
                await anyio.sleep(0.01)

    def count(self) -> int:
        """Open sockets on this instance."""
        return len(self.sockets)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def state_sync_frame(sid: str, state: Any, now: int) -> str:
    """The STATE_SYNC frame: the session's whole current state."""
    return _dumps({"type": "STATE_SYNC", "sessionId": sid, "timestamp": now,
                   "state": wire.session_json(state, now)})


def register_ws(app: Quart, svc: Services) -> None:
    """Attach the `/ws` endpoint."""
    clock = svc.clock
    relays: Relays = svc.relays

    @app.websocket("/ws")
    async def ws_endpoint() -> None:
        """`/ws?sessionId=…`: see docs/websocket.md for frames and close codes."""
        # Quart/Hypercorn: accept before awaiting anything else.
        await websocket.accept()
        sid_raw = websocket.args.get("sessionId")
        if not sid_raw:
            await websocket.close(1008, "Missing sessionId parameter")
            return
        if not _UUID.match(sid_raw):
            await websocket.close(1008, "Invalid sessionId format")
            return
        sid = sid_raw.lower()
        origin = websocket.headers.get("Origin")
        if origin is not None and not svc.cors.allows(origin, websocket.host):
            await websocket.close(1008, "Origin not allowed")
            return
        if svc.draining:
            await websocket.close(1012, "Service restart")
            return
        try:
            # Connections count against the caller's general limit, like REST requests (and a
            # failed authentication against the client address).
            caller, _ = await A.counted_caller(svc.auth, svc.limiter, lambda: _peer(svc),
                                         websocket.headers.get("Authorization"),
                                         websocket.args.get("token") or None)
        except RateLimited:
            await websocket.close(1008, "Rate limit exceeded")
            return
        except KairosError:
            await websocket.close(1008, "Unauthorized")
            return
        gated = False
        try:
            A.require_read(caller, await svc.host.get(sid))
        except SessionNotFound:
            # Clients may subscribe before they create (SyncKairos v2): wait for the session.
            gated = not caller.is_admin
        except KairosError:
            await websocket.close(1008, "Forbidden")
            return
        queue, raw = svc.settings.ws_send_queue, RawSocket.of(websocket.scope)
        sock = GatedSocket(queue, caller, raw) if gated else Socket(queue, raw)
        metrics.WS_CONNECTIONS.inc()
        structlog.contextvars.bind_contextvars(session_id=sid, sub=caller.sub)
        log.info("websocket connected", client=_peer(svc), user_agent=websocket.headers.get("User-Agent"))
        try:
            # Subscribed before CONNECTED (a client may act on it at once); what arrives in
            # between is held by the socket and written right after CONNECTED.
            await relays.join(sid, sock)
            await websocket.send(_dumps({"type": "CONNECTED", "sessionId": sid, "timestamp": clock()}))
            sock.connected()
            async with anyio.create_task_group() as tg:
                if sock.raw is None:
                    tg.start_soon(_sender, sock)
                tg.start_soon(_receiver, svc, sid, caller, sock)
                await sock.closing.wait()
                with anyio.move_on_after(2):  # a client that never reads cannot hold us here
                    await sock.flushed.wait()
                tg.cancel_scope.cancel()
            if sock.close_code is not None:
                with anyio.move_on_after(2) as scope:
                    await websocket.close(sock.close_code, sock.close_reason)
                if scope.cancelled_caught and sock.raw is not None:
                    sock.raw.abort()  # not even the close frame got out: the client stopped reading
        finally:
            metrics.WS_CONNECTIONS.dec()
            # close code None: the client went away (or its connection dropped)
            log.info("websocket disconnected", code=sock.close_code, reason=sock.close_reason)
            if sock.queue is not None:
                sock.queue.close()
            with anyio.CancelScope(shield=True):  # a disconnect cancels us; still unsubscribe
                await relays.leave(sid, sock)


def _peer(svc: Services) -> str:
    return svc.addresses.resolve(websocket.remote_addr, websocket.headers.get("X-Forwarded-For"))


async def _sender(sock: Socket) -> None:
    assert sock.recv_stream is not None
    try:
        async for frame in sock.recv_stream:
            await websocket.send(frame)
    finally:
        sock.flushed.set()


async def _receiver(svc: Services, sid: str, caller: A.Caller, sock: Socket) -> None:
    try:
        while True:
            raw = await websocket.receive()
            received = svc.clock()
            try:
                msg = json.loads(raw)
            except (ValueError, RecursionError, TypeError):
                continue  # bad JSON is ignored without closing
            if not isinstance(msg, dict):
                continue
            kind = msg.get("type")
            metrics.WS_MESSAGES.labels("in", kind if kind in _COMMANDS or kind in ("PING", "RECONNECT") else "other").inc()
            problems = unstorable(msg) if kind in _COMMANDS or kind in ("PING", "RECONNECT") else None
            if problems:  # U+0000, lone surrogates, numbers beyond 64 bits: refused like REST
                rid = _request_id(msg)
                echo = rid if rid is not None and not unstorable(rid) else None
                await websocket.send(W.ws_error_frame(W.validation_error(problems), echo))
                continue
            if kind == "PING":
                pong: dict[str, Any] = {"type": "PONG", "timestamp": received,
                                        "server_receive_ms": received}
                if "client_time" in msg:
                    pong["client_time"] = msg["client_time"]
                pong["server_send_ms"] = svc.clock()
                await websocket.send(_dumps(pong))
            elif kind == "RECONNECT":
                await _state_sync(svc, sid, caller, sock)
            elif kind in _COMMANDS:
                await websocket.send(await _command(svc, sid, caller, kind, msg))
            elif (request_id := _request_id(msg)) is not None:
                # A command the server does not know is answered; a frame without an id is not.
                err = UnknownCommand(f"Unknown command type {str(kind)[:64]!r}")
                await websocket.send(W.ws_error_frame(err, request_id))
    finally:
        sock.close(1000, "", flush=False)


async def _state_sync(svc: Services, sid: str, caller: A.Caller, sock: Socket) -> None:
    """Answer RECONNECT: a STATE_SYNC of the current state, written in line with the relayed
    updates (no await between the version check and the write)."""
    try:
        state = await svc.host.get(sid)
        if state.version < sock.version:
            # An update newer than this owner's copy already reached the socket: the stored
            # checkpoint has it (it is written before its update is published).
            state = await svc.host.get(sid, stored=True)
        A.require_read(caller, state)
    except Exception as exc:
        await websocket.send(W.ws_error_frame(W.as_kairos_error(exc)))
        return
    if state.version < sock.version:
        # Only a store that lost acknowledged writes answers older: follow it, or this socket
        # would skip every update until the session passes the version it had.
        sock.version = state.version
    sock.send(Frames([state_sync_frame(sid, state, svc.clock())], state.version, sync=True))


def _request_id(msg: dict[str, Any]) -> str | None:
    """The frame's `request_id` when it is a usable one (a string of at most 128 characters)."""
    request_id = msg.get("request_id")
    return request_id if isinstance(request_id, str) and len(request_id) <= 128 else None


async def _command(svc: Services, sid: str, caller: A.Caller, kind: str, msg: dict[str, Any]) -> str:
    """Run one socket command with REST's rules; returns the ACK or ERROR frame."""
    request_id = _request_id(msg)
    try:
        await svc.limiter.hit(caller.sub if svc.auth.enabled else _peer(svc))
        state = None if caller.is_admin else await svc.host.get(sid)
        if kind == "SWITCH":
            nxt, expected = msg.get("next_participant_id"), msg.get("expected_active_participant_id")
            for name, val in (("next_participant_id", nxt), ("expected_active_participant_id", expected)):
                if val is not None and (not isinstance(val, str) or not _UUID.match(val)):
                    raise ValidationError("Request validation failed",
                                          details=[{"field": name, "message": "must be a UUID", "code": "invalid_uuid"}])
            nxt = nxt.lower() if nxt else None
            expected = expected.lower() if expected else None
            if state is not None:
                expected = A.switch_guard(caller, state, expected)
            cmd: Any = C.Switch(nxt, expected, command_id=request_id)
        else:
            if state is not None:
                A.require_manage(caller, state)
            cmd = {"PAUSE": C.Pause, "RESUME": C.Resume, "START": C.Start,
                   "COMPLETE": C.Complete, "CANCEL": C.Cancel}[kind](command_id=request_id)
        t0 = time.perf_counter()
        reply = await svc.host.ask(sid, cmd)
        metrics.observe_command(svc.host, sid, kind.lower(), time.perf_counter() - t0, reply)
        if kind == "SWITCH":
            data = wire.switch_result_json(reply.state, reply.now_ms,
                                           reply.outcome.get("expired_participant_id"))
        else:
            data = wire.session_json(reply.state, reply.now_ms)
        return _dumps({"type": "ACK", "request_id": request_id, "data": data})
    except Exception as exc:  # every command gets an answer; the socket stays up
        return W.ws_error_frame(W.as_kairos_error(exc), request_id)
