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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import anyio
import structlog
from quart import Quart, websocket

from kairos import commands as C
from kairos import wire
from kairos.errors import KairosError, RateLimited, SessionNotFound, UnknownCommand, ValidationError
from web import auth as A
from web import errors as W
from web import metrics
from web.hypercorn_ws import RawWS, text_frame
from web.schemas import UUID_PATTERN, unstorable

if TYPE_CHECKING:
    from web.app import Services

log = structlog.get_logger("kairos.ws")

_UUID = re.compile(UUID_PATTERN)
_COMMANDS = {"SWITCH", "PAUSE", "RESUME", "START", "COMPLETE", "CANCEL"}
_FREEZE_EVERY = 1000  # socket joins between two gc.freeze() calls
_HEARTBEAT_SLOTS = 50  # sockets are pinged in this many groups spread over the interval
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
    """One connected client: frames are written straight to its connection (`RawWS`), or — when
    it has none (an HTTP/2 WebSocket) — queued for a sender task; closable from elsewhere."""

    __slots__ = ("raw", "limit", "held", "queue", "recv_stream", "close_code", "close_reason",
                 "closing", "flushed", "sid", "caller", "peer", "slot", "version")

    def __init__(self, queue_size: int, raw: RawWS | None = None, *, sid: str = "",
                 caller: A.Caller = A.ANONYMOUS_ADMIN, peer: str = "") -> None:
        self.raw = raw
        self.sid, self.caller, self.peer = sid, caller, peer
        self.slot = 0  # heartbeat slot (Relays)
        self.limit = queue_size * _BYTES_PER_FRAME
        # Frames that arrive between the subscription and the CONNECTED frame wait here.
        self.held: list[bytes] | None = [] if raw is not None else None
        self.queue: anyio.abc.ObjectSendStream[str] | None = None
        self.recv_stream: anyio.abc.ObjectReceiveStream[str] | None = None
        self.closing: anyio.Event | None = None  # someone asked to close this socket
        self.flushed: anyio.Event | None = None  # everything queued before the close went out
        if raw is None:
            self.queue, self.recv_stream = anyio.create_memory_object_stream[str](queue_size)
            self.closing, self.flushed = anyio.Event(), anyio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
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

    def reply(self, text: str) -> None:
        """Send one frame to this client only (an answer to what it sent)."""
        if self.raw is not None:
            if self.raw.writable():
                self.raw.write(text_frame(text.encode()))
        else:
            self.send(Frames([text]))

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
        if self.raw is not None:
            self.raw.close(code, reason)  # after what was written: it is in the transport already
            return
        assert self.queue is not None and self.closing is not None and self.flushed is not None
        self.queue.close()
        if not flush:
            self.flushed.set()
        self.closing.set()


class GatedSocket(Socket):
    """A socket opened before its session existed: its frames flow once the first state shows
    that the caller may read the session; otherwise it is closed with 1008 "Forbidden"."""

    __slots__ = ("allowed",)

    def __init__(self, queue_size: int, raw: RawWS | None = None, **kw: Any) -> None:
        super().__init__(queue_size, raw, **kw)
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
        t0 = time.perf_counter()
        # a deletion always goes out; an update's extra frames precede its STATE_UPDATE
        self.send(Frames(texts) if deleted else Frames(texts, version, events=len(texts) - 1))
        metrics.WS_FANOUT_SECONDS.observe(time.perf_counter() - t0)
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
        self._slots: list[set[Socket]] = [set() for _ in range(_HEARTBEAT_SLOTS)]
        self._joins = 0

    async def join(self, session_id: str, sock: Socket) -> None:
        """Add a socket to its session's relay; returns once the session is subscribed."""
        self.sockets.add(sock)
        self._joins += 1
        sock.slot = self._joins % _HEARTBEAT_SLOTS
        self._slots[sock.slot].add(sock)
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
        self._slots[sock.slot].discard(sock)
        relay = self.relays.get(session_id)
        if relay is None:
            return
        relay.sockets.discard(sock)
        if not relay.sockets:
            del self.relays[session_id]
            await self.svc.fanout.unwatch(session_id, relay)

    async def heartbeat(self, interval_s: float) -> None:
        """Ping every socket once per interval (and drop those that did not answer the last
        ping), one slot of sockets at a time so that no tick writes to all of them at once."""
        tick = 0
        while True:
            await anyio.sleep(interval_s / _HEARTBEAT_SLOTS)
            tick = (tick + 1) % _HEARTBEAT_SLOTS
            for sock in list(self._slots[tick]):
                if sock.raw is not None:
                    try:
                        sock.raw.heartbeat()
                    except Exception:  # one socket must never stop the heartbeat of the others
                        log.exception("heartbeat failed", session_id=sock.sid)

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


class Refused(Exception):
    """A connection refused after the handshake: closed with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class WsHandler:
    """`/ws?sessionId=…` (docs/websocket.md for frames and close codes), whatever carries the
    frames: `RawWS` (HTTP/1.1, served inside Hypercorn: `open`/`message`/`closed`) or Quart's
    websocket (HTTP/2, `ws_endpoint`)."""

    path = b"/ws"

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.relays: Relays = svc.relays  # type: ignore[assignment]

    async def admit(self, args: Mapping[str, str], header: Callable[[str], str | None],
                    remote_addr: str | None, raw: RawWS | None) -> Socket:
        """Check a new socket's request and subscribe it; raises Refused."""
        svc = self.svc
        sid_raw = args.get("sessionId")
        if not sid_raw:
            raise Refused(1008, "Missing sessionId parameter")
        if not _UUID.match(sid_raw):
            raise Refused(1008, "Invalid sessionId format")
        sid = sid_raw.lower()
        origin = header("origin")
        if origin is not None and not svc.cors.allows(origin, header("host")):
            raise Refused(1008, "Origin not allowed")
        if svc.draining:
            raise Refused(1012, "Service restart")
        peer = svc.addresses.resolve(remote_addr, header("x-forwarded-for"))
        try:
            # Connections count against the caller's general limit, like REST requests (and a
            # failed authentication against the client address).
            caller, _ = await A.counted_caller(svc.auth, svc.limiter, lambda: peer,
                                               header("authorization"), args.get("token") or None)
        except RateLimited:
            raise Refused(1008, "Rate limit exceeded") from None
        except KairosError:
            raise Refused(1008, "Unauthorized") from None
        gated = False
        version = 0
        try:
            state = await svc.host.get(sid)
            A.require_read(caller, state)
            version = state.version
        except SessionNotFound:
            # Clients may subscribe before they create (SyncKairos v2): wait for the session.
            gated = not caller.is_admin
        except KairosError:
            raise Refused(1008, "Forbidden") from None
        kind = GatedSocket if gated else Socket
        sock = kind(svc.settings.ws_send_queue, raw, sid=sid, caller=caller, peer=peer)
        # Changes up to the version read here happened before this socket: an update of one of
        # them still on its way through pub/sub (late across a cluster bus) is not sent to it.
        sock.version = version
        metrics.WS_CONNECTIONS.inc()
        structlog.contextvars.bind_contextvars(session_id=sid, sub=caller.sub)
        log.info("websocket connected", client=peer, user_agent=header("user-agent"))
        # Subscribed before CONNECTED (a client may act on it at once); what arrives in between
        # is held by the socket and written right after CONNECTED.
        try:
            await self.relays.join(sid, sock)
        except BaseException:  # e.g. the subscription failed: nothing may stay registered
            await self.gone(sock)
            raise
        return sock

    def hello(self, sock: Socket) -> str:
        """The CONNECTED frame."""
        # the same bytes as _dumps of that object (sid is a lower-case UUID), ~5x cheaper
        return f'{{"type":"CONNECTED","sessionId":"{sock.sid}","timestamp":{int(self.svc.clock())}}}'

    async def open(self, link: RawWS, target: bytes, headers: dict[str, str]) -> None:
        """A new HTTP/1.1 socket (upgrade accepted): admit it and send CONNECTED, or close it."""
        query = target.partition(b"?")[2].decode("latin-1")
        args: dict[str, str] = {}
        for k, v in parse_qsl(query, keep_blank_values=True, errors="replace"):
            args.setdefault(k, v)
        try:
            sock = await self.admit(args, headers.get, link.client[0] if link.client else None, link)
        except Refused as r:
            link.close(r.code, r.reason)
            return
        link.sock = sock  # from here on, the end of the connection unsubscribes it
        if link.writable():  # (the client may have gone while we checked)
            link.write(text_frame(self.hello(sock).encode()))
        sock.connected()

    async def message(self, link: RawWS, data: str | bytes) -> None:
        """A message from an HTTP/1.1 socket."""
        if link.sock is not None:
            await self.received(link.sock, data)

    async def closed(self, link: RawWS) -> None:
        """An HTTP/1.1 socket is gone."""
        if link.sock is not None:
            await self.gone(link.sock)

    async def gone(self, sock: Socket) -> None:
        """Unsubscribe a socket that has gone."""
        metrics.WS_CONNECTIONS.dec()
        # close code None: the client went away (or its connection dropped)
        log.info("websocket disconnected", code=sock.close_code, reason=sock.close_reason)
        if sock.queue is not None:
            sock.queue.close()
        with anyio.CancelScope(shield=True):  # a disconnect cancels us; still unsubscribe
            await self.relays.leave(sock.sid, sock)

    async def received(self, sock: Socket, data: str | bytes) -> None:
        """One message from the client: PING, RECONNECT or a command (anything else is ignored,
        or answered UNKNOWN_COMMAND when it has a request id)."""
        svc = self.svc
        received = svc.clock()
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError, TypeError):
            return  # bad JSON is ignored without closing
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        known = kind in _COMMANDS or kind in ("PING", "RECONNECT")
        metrics.WS_MESSAGES.labels("in", kind if known else "other").inc()
        problems = unstorable(msg) if known else None
        if problems:  # U+0000, lone surrogates, numbers beyond 64 bits: refused like REST
            rid = _request_id(msg)
            echo = rid if rid is not None and not unstorable(rid) else None
            sock.reply(W.ws_error_frame(W.validation_error(problems), echo))
            return
        if kind == "PING":
            pong: dict[str, Any] = {"type": "PONG", "timestamp": received, "server_receive_ms": received}
            if "client_time" in msg:
                pong["client_time"] = msg["client_time"]
            pong["server_send_ms"] = svc.clock()
            sock.reply(_dumps(pong))
        elif kind == "RECONNECT":
            await _state_sync(svc, sock)
        elif kind in _COMMANDS:
            sock.reply(await _command(svc, sock, kind, msg))
        elif (request_id := _request_id(msg)) is not None:
            # A command the server does not know is answered; a frame without an id is not.
            err = UnknownCommand(f"Unknown command type {str(kind)[:64]!r}")
            sock.reply(W.ws_error_frame(err, request_id))


def register_ws(app: Quart, svc: Services) -> WsHandler:
    """Attach the `/ws` endpoint; returns the handler that `web.hypercorn_ws` serves HTTP/1.1
    sockets with (this Quart route then only sees HTTP/2 ones)."""
    handler = WsHandler(svc)

    @app.websocket("/ws")
    async def ws_endpoint() -> None:
        """`/ws?sessionId=…` over HTTP/2: see docs/websocket.md for frames and close codes."""
        # Quart/Hypercorn: accept before awaiting anything else.
        await websocket.accept()
        args = {k: websocket.args.get(k, "") for k in websocket.args}
        try:
            sock = await handler.admit(args, websocket.headers.get, websocket.remote_addr, None)
        except Refused as r:
            await websocket.close(r.code, r.reason)
            return
        assert sock.closing is not None and sock.flushed is not None
        try:
            await websocket.send(handler.hello(sock))
            async with anyio.create_task_group() as tg:
                tg.start_soon(_sender, sock)
                tg.start_soon(_receiver, handler, sock)
                await sock.closing.wait()
                with anyio.move_on_after(2):  # a client that never reads cannot hold us here
                    await sock.flushed.wait()
                tg.cancel_scope.cancel()
            if sock.close_code is not None:
                with anyio.move_on_after(2):
                    await websocket.close(sock.close_code, sock.close_reason)
        finally:
            await handler.gone(sock)

    return handler


async def _sender(sock: Socket) -> None:
    assert sock.recv_stream is not None and sock.flushed is not None
    try:
        async for frame in sock.recv_stream:
            await websocket.send(frame)
    finally:
        sock.flushed.set()


async def _receiver(handler: WsHandler, sock: Socket) -> None:
    try:
        while True:
            await handler.received(sock, await websocket.receive())
    finally:
        sock.close(1000, "", flush=False)


async def _state_sync(svc: Services, sock: Socket) -> None:
    """Answer RECONNECT: a STATE_SYNC of the current state, written in line with the relayed
    updates (no await between the version check and the write)."""
    sid, caller = sock.sid, sock.caller
    try:
        state = await svc.host.get(sid)
        if state.version < sock.version:
            # An update newer than this owner's copy already reached the socket: the stored
            # checkpoint has it (it is written before its update is published).
            state = await svc.host.get(sid, stored=True)
        A.require_read(caller, state)
    except Exception as exc:
        sock.reply(W.ws_error_frame(W.as_kairos_error(exc)))
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


async def _command(svc: Services, sock: Socket, kind: str, msg: dict[str, Any]) -> str:
    """Run one socket command with REST's rules; returns the ACK or ERROR frame."""
    request_id = _request_id(msg)
    sid, caller = sock.sid, sock.caller
    try:
        await svc.limiter.hit(caller.sub if svc.auth.enabled else sock.peer)
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
