"""WebSocket contract (docs/websocket.md), the SDK's subscription and clock sync, and cross-instance fan-out."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from kairos.client import KairosClient, SubscriptionClosed, wall_clock_ms
from kairos.errors import InvalidStateTransition
from tests.servers import KairosServer, server_env
from tests.waiting import eventually
from tests.web.conftest import bearer, chess_body

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server_b(redis_url: str, database_url: str, module_prefix: str) -> Iterator[KairosServer]:
    """A second instance sharing Redis (same key prefix); short heartbeat to test dropping."""
    env = server_env(redis_url, database_url, module_prefix, KAIROS_RATE_LIMIT_GENERAL="0",
                     KAIROS_RATE_LIMIT_SWITCH="0", KAIROS_WS_HEARTBEAT_S="0.5")
    with KairosServer(env) as srv:
        srv.wait_ready()
        yield srv


def make_session(server: KairosServer, **extra: object) -> tuple[str, list[str]]:
    body = chess_body(**extra)
    with httpx.Client() as c:
        r = c.post(f"{server.url}/v1/sessions", json=body, headers=bearer(server.token("host-1")))
    assert r.status_code == 201, r.text
    return body["session_id"], [p["participant_id"] for p in body["participants"]]


async def closed_with(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with connect(url, additional_headers=headers) as ws:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


async def test_handshake_errors_close_with_1008(server: KairosServer) -> None:
    tok = server.token("host-1")
    assert await closed_with(server.ws_url) == (1008, "Missing sessionId parameter")
    assert await closed_with(f"{server.ws_url}?sessionId=nope&token={tok}") == (1008, "Invalid sessionId format")
    sid, _ = make_session(server)
    assert await closed_with(f"{server.ws_url}?sessionId={sid}") == (1008, "Unauthorized")
    assert await closed_with(f"{server.ws_url}?sessionId={sid}&token=forged.token.x") == (1008, "Unauthorized")


async def test_connected_then_updates_sync_and_pong(server: KairosServer) -> None:
    sid, (p1, p2) = make_session(server)
    tok = server.token("host-1")
    async with connect(f"{server.ws_url}?sessionId={sid}&token={tok}") as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "CONNECTED" and hello["sessionId"] == sid
        assert isinstance(hello["timestamp"], int)
        await ws.send("not json")  # ignored, socket stays open
        await ws.send(json.dumps({"type": "NOPE"}))
        await ws.send(json.dumps({"type": "PING", "client_time": 123}))
        pong = json.loads(await ws.recv())
        assert pong["type"] == "PONG" and pong["client_time"] == 123
        assert pong["server_receive_ms"] <= pong["server_send_ms"]
        assert abs(pong["timestamp"] - wall_clock_ms()) < 1000
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(tok)) as http:
            await http.post(f"/v1/sessions/{sid}/start")
        update = json.loads(await ws.recv())
        assert update["type"] == "STATE_UPDATE" and update["sessionId"] == sid
        assert update["state"]["version"] == 2 and update["state"]["active_participant_id"] == p1
        await ws.send(json.dumps({"type": "RECONNECT", "last_version": 1}))
        sync = json.loads(await ws.recv())
        assert sync["type"] == "STATE_SYNC" and sync["state"]["version"] == 2
        assert sync["state"]["status"] == "running"


async def test_commands_over_the_socket_answer_ack_or_error(server: KairosServer) -> None:
    sid, (p1, p2) = make_session(server)
    async with KairosClient(server.url, server.token("host-1")) as kc, kc.subscribe(sid) as sub:
        await sub.next_frame("CONNECTED")
        started = await sub.command("START")
        assert started.status == "running" and started.version == 2
        switched = await sub.command("SWITCH", request_id="r-17")
        assert switched.active_participant_id == p2 and switched.version == 3
        assert switched.expired_participant_id is None
        with pytest.raises(InvalidStateTransition):
            await sub.command("RESUME")
        err = await sub._roundtrip("bad-1", {"type": "SWITCH", "request_id": "bad-1",
                                             "next_participant_id": "zz"}, 5)
        assert err == {"type": "ERROR", "code": "VALIDATION_ERROR", "message": "Request validation failed",
                       "details": [{"field": "next_participant_id", "message": "must be a UUID",
                                    "code": "invalid_uuid"}], "request_id": "bad-1"}
        versions = []
        while len(versions) < 2:
            versions.append((await sub.next_frame("STATE_UPDATE")).state.version)
        assert versions == [2, 3]


async def test_frame_over_64_kb_closes_with_1009(server: KairosServer) -> None:
    sid, _ = make_session(server)
    async with connect(f"{server.ws_url}?sessionId={sid}&token={server.token('host-1')}",
                       max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "PING", "pad": "x" * 70_000}))
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_server_made_expiry_sends_warning_then_expired_then_update(server: KairosServer) -> None:
    body = chess_body(time_warning_ms=700)
    for p in body["participants"]:
        p["total_time_ms"] = 1000
    async with KairosClient(server.url, server.token("host-1")) as kc:
        await kc.create_session(body)
        sid, p1 = body["session_id"], body["participants"][0]["participant_id"]
        async with kc.subscribe(sid) as sub:
            await sub.next_frame("CONNECTED")
            await kc.start(sid)
            await sub.next_frame("STATE_UPDATE")
            warning = await sub.next_frame("TIME_WARNING", "TIME_EXPIRED", wait_s=5)
            assert warning.type == "TIME_WARNING" and warning.participant_id == p1
            assert 0 <= warning.remaining_ms <= 700
            await sub.next_frame("STATE_UPDATE")  # the warning's own change
            expired = await sub.next_frame("TIME_EXPIRED", "STATE_UPDATE", wait_s=5)
            assert expired.type == "TIME_EXPIRED" and expired.participant_id == p1
            assert expired.state.status == "expired"
            update = await sub.next_frame()
            assert update.type == "STATE_UPDATE" and update.state.status == "expired"
            gone = update.state.participants[0]
            assert gone.has_expired is True and gone.time_remaining_ms == 0


async def test_delete_sends_session_deleted_then_closes_1000(server: KairosServer) -> None:
    sid, _ = make_session(server)
    async with KairosClient(server.url, server.token("host-1")) as kc, kc.subscribe(sid) as sub:
        await sub.next_frame("CONNECTED")
        await kc.delete_session(sid)
        deleted = await sub.next_frame("SESSION_DELETED")
        assert deleted.session_id == sid
        closed = await sub.next_frame("CLOSED")
        assert (closed.code, closed.reason) == (1000, "Session deleted")
        assert isinstance(sub.closed, SubscriptionClosed)


async def test_change_through_one_instance_reaches_a_socket_on_the_other(
    server: KairosServer, server_b: KairosServer
) -> None:
    sid, (p1, p2) = make_session(server)
    async with KairosClient(server_b.url, server_b.token("host-1")) as kb, kb.subscribe(sid) as sub:
        await sub.next_frame("CONNECTED")
        async with KairosClient(server.url, server.token("host-1")) as ka:
            await ka.start(sid)
            await ka.switch(sid)
        first = await sub.next_frame("STATE_UPDATE")
        second = await sub.next_frame("STATE_UPDATE")
        assert [first.state.version, second.state.version] == [2, 3]
        assert second.state.active_participant_id == p2
        # and a command sent over B's socket is forwarded to the owner and acknowledged
        ack = await sub.switch()
        assert ack.active_participant_id == p1 and ack.version == 4


async def test_clock_offset_with_skewed_client_clock_is_within_5_ms(server: KairosServer) -> None:
    skew = 1234.0
    async with KairosClient(server.url, server.token("host-1"),
                            clock=lambda: wall_clock_ms() + skew) as kc:
        sid, _ = make_session(server)
        async with kc.subscribe(sid) as sub:
            await sub.next_frame("CONNECTED")
            sample = await sub.sync_clock(samples=10)
        # same machine: the true offset (server - client) is exactly -skew
        assert abs(sample.offset_ms - (-skew)) <= 5, sample
        assert abs(kc.server_now() - wall_clock_ms()) <= 5


async def test_a_socket_that_answers_pings_stays_through_many_heartbeats(server_b: KairosServer) -> None:
    from urllib.parse import urlsplit

    from bench._wsraw import open_ws

    sid, _ = make_session(server_b)
    u = urlsplit(server_b.url)
    frames: list[bytes] = []
    ws = await open_ws(u.hostname or "", u.port or 0, f"/ws?sessionId={sid}&token={server_b.token('host-1')}",
                       lambda _ws, payload, _t: frames.append(payload))
    try:
        await eventually(lambda: ws.pings >= 4, within=10, what="4 heartbeats (0.5 s apart) answered")
        assert ws.close_code is None and not ws.closed.done()
        assert json.loads(frames[0])["type"] == "CONNECTED"
    finally:
        assert ws.transport is not None
        ws.transport.close()


def test_socket_that_never_answers_pings_is_dropped(server_b: KairosServer) -> None:
    sid, _ = make_session(server_b)
    s = socket.create_connection(("127.0.0.1", server_b.port), timeout=5)
    tok = server_b.token("host-1")
    s.sendall((f"GET /ws?sessionId={sid}&token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    start = time.monotonic()
    # Read (never answering pings) until the server closes the TCP connection.
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        assert time.monotonic() - start < 5, "server kept a silent socket"
    s.close()
    assert b" 101 " in data.split(b"\r\n", 1)[0]
    assert b"\x88" in data  # a close frame was sent before the connection went away


async def test_sdk_reconnects_and_resyncs_after_the_server_closes_the_socket(server: KairosServer) -> None:
    sid, (p1, p2) = make_session(server)
    async with KairosClient(server.url, server.token("host-1")) as kc, kc.subscribe(sid) as sub:
        await sub.next_frame("CONNECTED")
        await kc.start(sid)
        await sub.next_frame("STATE_UPDATE")
        assert sub._ws is not None
        await sub._ws.send("x" * 70_000)  # over the 64 KB frame limit: the server closes with 1009
        await sub.next_frame("CONNECTED")
        sync = await sub.next_frame("STATE_SYNC")
        assert sync.state.version == 2 and sub.connects == 2
        await kc.switch(sid)
        assert (await sub.next_frame("STATE_UPDATE")).state.active_participant_id == p2


class _FakeSocket:
    """Stands in for the network side of a websocket: yields frames, records what is sent."""

    def __init__(self, frames: list[dict]) -> None:
        self.frames = [json.dumps(f) for f in frames]
        self.sent: list[dict] = []

    def __aiter__(self):  # noqa: ANN204
        return self._gen()

    async def _gen(self):  # noqa: ANN202
        for f in self.frames:
            yield f

    async def send(self, data: str) -> None:
        self.sent.append(json.loads(data))


async def test_sdk_asks_for_state_sync_on_a_version_gap() -> None:
    kc = KairosClient("http://127.0.0.1:1")
    sub = kc.subscribe("s")
    fake = _FakeSocket([
        {"type": "STATE_UPDATE", "state": {"version": 3}},
        {"type": "STATE_UPDATE", "state": {"version": 4}},
        {"type": "STATE_UPDATE", "state": {"version": 7}},  # 5 and 6 were missed
    ])
    await sub._read(fake)  # type: ignore[arg-type]
    assert fake.sent == [{"type": "RECONNECT", "last_version": 4}]
    assert sub.last_version == 7
    await kc.aclose()


async def test_metrics_show_ws_commands_connections_and_actors(server: KairosServer) -> None:
    sid, _ = make_session(server)
    async with KairosClient(server.url, server.token("host-1")) as kc, kc.subscribe(sid) as sub:
        await sub.next_frame("CONNECTED")
        await sub.command("START")
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{server.url}/metrics")).text
    assert 'kairos_command_seconds_count{command="start",path="local"}' in text
    assert "kairos_ws_connections " in text and "kairos_actors_active " in text
    assert "kairos_event_loop_lag_seconds_count " in text
    connections = next(float(line.split()[1]) for line in text.splitlines()
                       if line.startswith("kairos_ws_connections "))
    assert connections >= 1


async def test_instance_unsubscribes_after_its_last_socket_leaves(
    server: KairosServer, redis_url: str, module_prefix: str
) -> None:
    import redis.asyncio as aioredis

    from actors.keys import Keys

    sid, _ = make_session(server)
    channel = Keys(module_prefix).channel(sid)
    client = aioredis.from_url(redis_url)

    async def subscribers() -> int:
        return dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0)

    try:
        url = f"{server.ws_url}?sessionId={sid}&token={server.token('host-1')}"
        async with connect(url) as one, connect(url) as two:
            await one.recv()
            await two.recv()
            assert await subscribers() == 1  # two sockets, one subscription
        async def unsubscribed() -> bool:
            return await subscribers() == 0

        await eventually(unsubscribed, within=5, what="the server's unsubscribe after the last socket")
    finally:
        await client.aclose()


async def test_sockets_get_a_state_sync_after_the_fanout_connection_drops(
    server: KairosServer, redis_url: str
) -> None:
    """Issue 9 defect 3: whatever was published while the pub/sub connection was down is lost;
    after the reconnect every socket gets a fresh STATE_SYNC (the idle one too)."""
    import anyio
    import redis.asyncio as aioredis

    idle, _ = make_session(server)
    busy, _ = make_session(server)
    tok = server.token("host-1")
    name = f"kairos-fanout:{server.env['KAIROS_INSTANCE_ID']}"
    client = aioredis.from_url(redis_url)
    try:
        async with connect(f"{server.ws_url}?sessionId={idle}&token={tok}") as a, \
                connect(f"{server.ws_url}?sessionId={busy}&token={tok}") as b, \
                httpx.AsyncClient(base_url=server.url, headers=bearer(tok)) as http:
            assert json.loads(await a.recv())["type"] == json.loads(await b.recv())["type"] == "CONNECTED"
            await http.post(f"/v1/sessions/{busy}/start")
            assert json.loads(await b.recv())["state"]["version"] == 2
            ids = [c["id"] for c in await client.client_list() if c.get("name") == name]
            assert len(ids) == 1, "the instance's fan-out connection is named after it"
            await client.client_kill_filter(_id=ids[0])
            # a switch right after the drop: its update may be published before the resubscribe
            switched = await http.post(f"/v1/sessions/{busy}/switch")
            assert switched.status_code == 200, switched.text
            version = switched.json()["data"]["version"]

            async def synced(ws: object, at_least: int) -> int:
                """Read until a STATE_SYNC came and `at_least` was seen (by it or a later update:
                the sync reads the state after the resubscribe, so nothing newer is lost)."""
                got_sync, newest = False, 0
                with anyio.fail_after(10):
                    while not (got_sync and newest >= at_least):
                        frame = json.loads(await ws.recv())  # type: ignore[attr-defined]
                        got_sync = got_sync or frame["type"] == "STATE_SYNC"
                        newest = max(newest, frame["state"]["version"])
                return newest

            assert await synced(a, 1) == 1  # the idle session is re-synced too
            assert await synced(b, version) == version
    finally:
        await client.aclose()


async def test_an_update_older_than_the_sockets_state_sync_is_never_sent_to_it(
    server: KairosServer, redis_url: str, module_prefix: str
) -> None:
    """Versions on a socket never go back: updates still on their way through pub/sub when a
    STATE_SYNC of a newer state went out (a re-sync after a drain's 1012 saw 12, 11, 12) are
    skipped, the same version again too; the next change arrives as usual."""
    import redis.asyncio as aioredis

    from actors.keys import Keys

    sid, _ = make_session(server)
    tok = server.token("host-1")
    channel = Keys(module_prefix).channel(sid)
    client = aioredis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(tok)) as http, \
                connect(f"{server.ws_url}?sessionId={sid}&token={tok}") as ws:
            assert json.loads(await ws.recv())["type"] == "CONNECTED"
            await http.post(f"/v1/sessions/{sid}/start")
            assert json.loads(await ws.recv())["state"]["version"] == 2
            assert (await http.post(f"/v1/sessions/{sid}/switch")).json()["data"]["version"] == 3
            assert json.loads(await ws.recv())["state"]["version"] == 3
            await ws.send(json.dumps({"type": "RECONNECT", "last_version": 3}))
            sync = json.loads(await ws.recv())
            assert (sync["type"], sync["state"]["version"]) == ("STATE_SYNC", 3)

            async def subscribed() -> bool:
                return dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0) == 1

            await eventually(subscribed, within=5, what="the instance's subscription")
            # late copies of older updates, published on the session's channel as the owner does
            for version in (2, 3):
                stale = {"session_id": sid, "version": version, "server_time_ms": sync["timestamp"],
                         "events": [], "state": {**sync["state"], "version": version}}
                await client.publish(channel, json.dumps(stale))
            switched = await http.post(f"/v1/sessions/{sid}/switch")  # published after them
            assert switched.json()["data"]["version"] == 4
            after = json.loads(await ws.recv())
            assert (after["type"], after["state"]["version"]) == ("STATE_UPDATE", 4)
    finally:
        await client.aclose()


def _raw_socket(server: KairosServer, sid: str) -> socket.socket:
    """A TCP connection that has done the WebSocket handshake (and read up to CONNECTED)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall((f"GET /ws?sessionId={sid}&token={server.token('host-1')} HTTP/1.1\r\nHost: x\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"CONNECTED" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 101") and b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head
    return s


def _client_frame(first: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return bytes([first]) + size + mask + masked


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each whole server frame in `data`, heartbeat pings left out."""
    frames = []
    while len(data) >= 2:
        n, head = data[1], 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        if len(data) < head + n:
            break
        if data[0] != 0x89:
            frames.append((data[0], data[head:head + n]))
        data = data[head + n:]
    return frames


def _read_until_closed(s: socket.socket) -> list[tuple[int, bytes]]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return _server_frames(data)


def test_fragments_pings_and_protocol_errors_follow_rfc_6455(server: KairosServer) -> None:
    """The server's own framing: a message in fragments with a ping between them is one message
    (the ping answered with its payload); a frame the RFC forbids closes the socket with its code."""
    sid, _ = make_session(server)
    s = _raw_socket(server, sid)
    msg = json.dumps({"type": "PING", "client_time": 7}).encode()
    s.sendall(_client_frame(0x01, msg[:5]) + _client_frame(0x89, b"hi") + _client_frame(0x80, msg[5:]))
    data = b""
    while len(_server_frames(data)) < 2:
        data += s.recv(65536)
    (pong, payload), (text, answer) = _server_frames(data)
    assert (pong, payload) == (0x8A, b"hi")  # before the answer to the whole message
    assert text == 0x81 and json.loads(answer)["client_time"] == 7
    s.sendall(_client_frame(0x81, b"\xff\xfe"))  # not UTF-8
    assert _read_until_closed(s) == [(0x88, (1007).to_bytes(2, "big"))]
    s.close()
    s = _raw_socket(server, sid)
    s.sendall(b"\x81\x02{}")  # a client frame without a mask
    assert _read_until_closed(s) == [(0x88, (1002).to_bytes(2, "big"))]
    s.close()
    s = _raw_socket(server, sid)
    s.sendall(_client_frame(0x88, (1000).to_bytes(2, "big") + b"bye"))  # the client closes
    assert _read_until_closed(s)[0] == (0x88, (1000).to_bytes(2, "big"))
    s.close()


async def test_an_update_from_before_the_socket_connected_is_not_sent_to_it(
    server: KairosServer, redis_url: str, module_prefix: str
) -> None:
    """After CONNECTED a socket gets changes made since, not a late pub/sub copy of one made
    before it connected (seen on a Redis Cluster, whose bus can deliver the create's update late)."""
    import redis.asyncio as aioredis

    from actors.keys import Keys

    sid, _ = make_session(server)
    tok = server.token("host-1")
    channel = Keys(module_prefix).channel(sid)
    client = aioredis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(tok)) as http:
            state = (await http.get(f"/v1/sessions/{sid}")).json()["data"]
            assert state["version"] == 1
            async with connect(f"{server.ws_url}?sessionId={sid}&token={tok}") as ws:
                hello = json.loads(await ws.recv())
                assert hello["type"] == "CONNECTED"
                # a late copy of the create's update, published on the channel as the owner does
                late = {"session_id": sid, "version": 1, "server_time_ms": hello["timestamp"],
                        "events": [], "state": state}
                await client.publish(channel, json.dumps(late))
                await http.post(f"/v1/sessions/{sid}/start")  # published after it
                after = json.loads(await ws.recv())
                assert (after["type"], after["state"]["version"]) == ("STATE_UPDATE", 2)
    finally:
        await client.aclose()
