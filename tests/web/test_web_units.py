"""Pure pieces of the web edge: limiter windows, proxy addresses, WS frames, socket queues, errors."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kairos.errors import RateLimited
from web.errors import error_body, from_pydantic, ws_error_frame
from web.hypercorn_ws import CLOSING, RawWS, close_frame
from web.limits import ClientAddress, GeneralLimiter
from web.schemas import CreateSession
from web.ws import Frames, Socket, update_frames


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.anyio
async def test_general_limiter_counts_per_caller_and_resets_each_window() -> None:
    clock = FakeClock(600.0)
    lim = GeneralLimiter(2, clock)
    assert await lim.hit("a") is not None and (await lim.hit("a")).remaining == 0  # type: ignore[union-attr]
    with pytest.raises(RateLimited) as info:
        await lim.hit("a")
    assert info.value.retry_after == 60
    assert (await lim.hit("b")).remaining == 1  # type: ignore[union-attr]
    clock.t = 659.5
    with pytest.raises(RateLimited) as info:
        await lim.hit("a")
    assert info.value.retry_after == 1
    clock.t = 660.0
    assert (await lim.hit("a")).remaining == 1  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_zero_disables_the_general_limit() -> None:
    lim = GeneralLimiter(0, FakeClock(0))
    assert all([await lim.hit("a") is None for _ in range(1000)])


@pytest.mark.anyio
async def test_an_unreachable_shared_count_falls_back_to_counting_here() -> None:
    async def unreachable(caller: str, window: int, window_ms: int) -> int:
        raise ConnectionError("redis down")

    lim = GeneralLimiter(1, FakeClock(600.0), shared=unreachable)
    assert (await lim.hit("a")).remaining == 0  # type: ignore[union-attr]
    with pytest.raises(RateLimited):
        await lim.hit("a")


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    addr = ClientAddress(["10.0.0.0/8"])
    assert addr.resolve("203.0.113.9", "1.2.3.4") == "203.0.113.9"  # untrusted peer: ignore header
    assert addr.resolve("10.0.0.2", "1.2.3.4") == "1.2.3.4"
    assert addr.resolve("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.7") == "1.2.3.4"  # spoofed left part
    assert addr.resolve("10.0.0.2", None) == "10.0.0.2"
    assert ClientAddress([]).resolve("10.0.0.2", "1.2.3.4") == "10.0.0.2"


def _message(events: list[dict], state: dict | None, expired: str | None = None) -> bytes:
    msg = {"session_id": "s", "version": 5, "server_time_ms": 1000, "events": events, "state": state}
    if expired:
        msg["expired_participant_id"] = expired
    return json.dumps(msg).encode()


def test_update_frames_order_warning_expired_then_update() -> None:
    state = {"status": "expired", "version": 5}
    frames, deleted, version = update_frames(_message(
        [{"type": "time_warning", "participant_id": "p", "data": {"time_remaining_ms": 9}}], state, "p"))
    assert version == 5
    kinds = [json.loads(f)["type"] for f in frames]
    assert kinds == ["TIME_WARNING", "TIME_EXPIRED", "STATE_UPDATE"] and not deleted
    warning = json.loads(frames[0])
    assert warning == {"type": "TIME_WARNING", "sessionId": "s", "timestamp": 1000, "participant_id": "p",
                       "remaining_ms": 9}


def test_update_frames_for_a_deletion() -> None:
    frames, deleted, _ = update_frames(_message([{"type": "session_deleted"}], None))
    assert deleted and [json.loads(f) for f in frames] == [
        {"type": "SESSION_DELETED", "sessionId": "s", "timestamp": 1000}]


def test_a_full_socket_queue_drops_the_socket_without_blocking() -> None:
    sock = Socket(2)  # no raw transport (an HTTP/2 WebSocket): the queued path
    assert sock.send(Frames(["a"])) and sock.send(Frames(["b"]))
    assert not sock.send(Frames(["c"]))
    assert sock.close_code == 1013 and sock.closing.is_set() and sock.flushed.is_set()


class _Transport:
    """Stands in for the TCP transport of a client that reads nothing: every byte stays buffered."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.aborted = self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return len(self.data)

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the server runs on asyncio (uvloop)
async def test_frames_are_framed_once_and_a_reader_that_stops_is_dropped_at_its_bound() -> None:
    transport = _Transport()
    link = RawWS(None, transport, None, None, 65536)  # type: ignore[arg-type]
    sock = Socket(2, link)
    early = Frames(["before CONNECTED"])
    assert sock.send(early) and transport.data == b""  # held until CONNECTED is out
    sock.connected()
    assert bytes(transport.data) == early.data
    transport.data.clear()
    frames = Frames(["x" * 1100, "\u00e9"])
    # one unmasked text frame each (16-bit length for 1100 bytes), UTF-8 payloads
    assert frames.data == b"\x81\x7e\x04\x4c" + b"x" * 1100 + b"\x81\x02\xc3\xa9"
    assert sock.send(frames) and bytes(transport.data) == frames.data
    assert sock.send(frames)  # below the bound (2 frames of 1 KB) before this write
    assert not sock.send(frames)
    # dropped: a close frame after what was written, and no more frames
    assert sock.close_code == 1013 and link.state == CLOSING
    assert bytes(transport.data) == 2 * frames.data + close_frame(1013, "Client too slow")
    assert not sock.send(frames)
    link._timer.cancel()  # type: ignore[union-attr]


class _ClosedTransport(_Transport):
    """A connection the client has dropped, its end not yet seen by the read task: uvloop raises
    on any write."""

    def is_closing(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_heartbeat_and_close_of_a_dropped_connection_write_nothing() -> None:
    """A raising heartbeat write stopped the heartbeat task, and with it the instance's services."""
    for pong in (True, False):  # the ping, or the drop of a socket that missed the last one
        link = RawWS(None, _ClosedTransport(), None, None, 65536)  # type: ignore[arg-type]
        link.pong = pong
        link.heartbeat()
        if link._timer is not None:
            link._timer.cancel()
    link = RawWS(None, _ClosedTransport(), None, None, 65536)  # type: ignore[arg-type]
    Socket(2, link).close(1012, "Service restart")
    assert link.state == CLOSING
    link._timer.cancel()  # type: ignore[union-attr]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_socket_that_missed_a_heartbeat_is_aborted_if_its_close_cannot_flush() -> None:
    """Closing waits for unsent bytes, which a vanished peer never takes: the connection stayed
    open (bench fanout --slow-reader saw it 3 s after the heartbeat close)."""
    import asyncio

    transport = _Transport()
    link = RawWS(None, transport, None, None, 65536)  # type: ignore[arg-type]
    link.heartbeat()  # ping
    link.heartbeat()  # no pong since: dropped
    assert bytes(transport.data) == b"\x89\x00" + close_frame(1011, "Heartbeat missed")
    assert transport.closed and not transport.aborted and link._timer is not None
    when = link._timer.when() - asyncio.get_running_loop().time()
    assert 0 < when <= 2.0
    link._timer._run()  # type: ignore[attr-defined]  # the deadline passes: the close never ended
    assert transport.aborted
    link._timer.cancel()


def test_pydantic_errors_become_dotted_details() -> None:
    with pytest.raises(ValidationError) as info:
        CreateSession.model_validate({"session_id": "x", "sync_mode": "global",
                                      "participants": [{"participant_id": "y", "total_time_ms": 1}]})
    body = error_body(from_pydantic(info.value))
    fields = {d["field"]: d["code"] for d in body["error"]["details"]}
    assert fields == {"session_id": "invalid_uuid", "participants.0.participant_id": "invalid_uuid",
                      "participants.0.total_time_ms": "too_small"}


def test_ws_error_frame_carries_request_id_and_retry() -> None:
    frame = json.loads(ws_error_frame(RateLimited("slow down", retry_after=2), "r-1"))
    assert frame == {"type": "ERROR", "code": "RATE_LIMIT_EXCEEDED", "message": "slow down",
                     "retry_after_seconds": 2, "request_id": "r-1"}


def test_unavailable_answers_503_with_retry_after() -> None:
    from kairos.errors import Unavailable
    from web.errors import error_response

    resp = error_response(Unavailable("owner unreachable", retry_after=3))
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "3"


def test_auth_disabled_makes_every_caller_a_local_admin() -> None:
    from web.auth import Authenticator
    from web.settings import Settings

    auth = Authenticator(Settings(auth="disabled"))
    caller = auth.caller(None)
    assert caller.is_admin and caller.sub == "anonymous"


def test_kairos_token_mints_with_the_local_secret(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    import jwt

    from web.cli import main

    monkeypatch.setenv("KAIROS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("KAIROS_JWT_SECRET", raising=False)
    main(["token", "--sub", "alice", "--role", "admin", "--ttl", "60"])
    token = capsys.readouterr().out.strip()
    secret = (tmp_path / "jwt-secret").read_text().strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["role"] == "admin"
    assert 0 < claims["exp"] - claims["iat"] <= 60
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-0123456789abcdef0123456789", algorithms=["HS256"])


def test_store_outages_map_to_503_and_surprises_to_500() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from web.errors import as_kairos_error

    assert as_kairos_error(RedisConnectionError("down")).status == 503
    assert as_kairos_error(ConnectionRefusedError()).code == "UNAVAILABLE"
    err = as_kairos_error(RuntimeError("bug"))
    assert (err.status, err.code) == (500, "INTERNAL_ERROR")


def test_resync_sends_the_current_state_unless_a_newer_update_already_went_out() -> None:
    import anyio

    from kairos import apply
    from tests.core.helpers import T0, make_create
    from web.ws import Relay, Relays

    state = apply(None, make_create(), T0).state  # version 1

    class Host:
        async def get(self, sid: str) -> object:
            return state

    class Svc:
        host = Host()
        clock = staticmethod(lambda: T0)

    relays = Relays(Svc())
    sent: list[Frames] = []
    relay = relays.relays[state.session_id] = Relay(state.session_id)
    relay.send = sent.append  # type: ignore[method-assign]
    anyio.run(relays.resync, [state.session_id])
    assert [json.loads(f.texts[0])["type"] for f in sent] == ["STATE_SYNC"]
    relay.version = 2  # an update newer than the state read arrived after the resubscribe
    anyio.run(relays.resync, [state.session_id])
    assert len(sent) == 1


def test_a_socket_never_gets_a_version_it_already_has_except_a_sync_and_the_changes_alerts() -> None:
    import anyio

    sock = Socket(20)  # the queued path: what was sent is readable from the stream

    def sent() -> list[tuple[str, int | None]]:
        out = []
        assert sock.recv_stream is not None
        while True:
            try:
                f = json.loads(sock.recv_stream.receive_nowait())
            except anyio.WouldBlock:
                return out
            out.append((f["type"], (f.get("state") or {}).get("version")))

    def update(version: int, *alerts: str) -> Frames:
        texts = [json.dumps({"type": t, "state": {"version": version}}) for t in (*alerts, "STATE_UPDATE")]
        return Frames(texts, version, events=len(alerts))

    def sync(version: int) -> Frames:
        return Frames([json.dumps({"type": "STATE_SYNC", "state": {"version": version}})], version, sync=True)

    assert sock.send(update(3)) and sock.send(sync(5))
    assert sock.send(update(4)) and sock.send(update(5))  # overtaken by the STATE_SYNC: skipped
    assert sent() == [("STATE_UPDATE", 3), ("STATE_SYNC", 5)]
    # the change the STATE_SYNC showed still tells its expiry; an older one tells nothing
    assert sock.send(update(5, "TIME_EXPIRED")) and sock.send(update(4, "TIME_WARNING"))
    assert sent() == [("TIME_EXPIRED", 5)]
    assert sock.send(sync(5)) and sock.send(sync(4))  # RECONNECT answered again: same state is fine
    assert sent() == [("STATE_SYNC", 5)]
    assert sock.send(update(6)) and sock.send(Frames([json.dumps({"type": "SESSION_DELETED"})]))
    assert sent() == [("STATE_UPDATE", 6), ("SESSION_DELETED", None)]
    assert sock.version == 6


def test_reconnect_answer_reads_the_checkpoint_when_the_socket_is_ahead_of_the_owners_copy() -> None:
    """The owner's in-memory state changes when its write's reply arrives; the write's update
    can reach this instance's sockets first. RECONNECT then answers from the checkpoint."""
    import dataclasses

    import anyio

    from kairos import apply
    from tests.core.helpers import T0, make_create
    from web import ws as W

    old = apply(None, make_create(), T0).state  # version 1
    new = dataclasses.replace(old, version=2)
    reads: list[bool] = []

    class Host:
        async def get(self, sid: str, *, stored: bool = False) -> object:
            reads.append(stored)
            return new if stored else old

    class Svc:
        host = Host()
        clock = staticmethod(lambda: T0)

    sock = Socket(20, sid=old.session_id)
    sock.version = 2  # the update of version 2 went out already
    anyio.run(W._state_sync, Svc(), sock)
    assert reads == [False, True]
    assert sock.recv_stream is not None
    frame = json.loads(sock.recv_stream.receive_nowait())
    assert (frame["type"], frame["state"]["version"]) == ("STATE_SYNC", 2)
