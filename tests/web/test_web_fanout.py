"""actors/fanout.py against a real Redis: one subscription per watched session, relayed bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from actors.fanout import FanOut
from actors.keys import Keys
from tests.waiting import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def subscribers(client: aioredis.Redis, channel: str) -> int:
    return dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0)


async def subscribed(client: aioredis.Redis, channel: str, count: int) -> bool:
    return await subscribers(client, channel) == count


@dataclass
class Gapped:
    """A FanOut whose watcher connection tests break, what it relayed and the gaps it reported."""

    fanout: FanOut
    client: aioredis.Redis  # a second connection, to publish and to look at the server
    got: list[bytes] = field(default_factory=list)
    gaps: list[list[str]] = field(default_factory=list)


@asynccontextmanager
async def gapped(redis_url: str, key_prefix: str, client_name: str | None = None) -> AsyncIterator[Gapped]:
    watcher = aioredis.from_url(redis_url, client_name=client_name)
    client = aioredis.from_url(redis_url)
    gaps: list[list[str]] = []

    async def on_gap(sessions: list[str]) -> None:
        gaps.append(sessions)

    try:
        async with FanOut(watcher, key_prefix=key_prefix, on_gap=on_gap) as fanout:
            yield Gapped(fanout, client, gaps=gaps)
    finally:
        await client.aclose()
        await watcher.aclose()




async def test_subscribe_on_first_watcher_unsubscribe_on_last(redis_url: str, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    channel = keys.channel("s1")
    client = aioredis.from_url(redis_url)
    a: list[bytes] = []
    b: list[bytes] = []
    try:
        async with FanOut(client, key_prefix=key_prefix) as fanout:
            assert await subscribers(client, channel) == 0
            await fanout.watch("s1", a.append)
            await fanout.watch("s1", b.append)
            # SUBSCRIBE is sent, not confirmed, when watch returns: wait for Redis to count it
            await eventually(lambda: subscribed(client, channel, 1), what="one subscription")
            await client.publish(channel, b"update-1")
            await eventually(lambda: len(a) == 1 and len(b) == 1, what="both watchers relayed")
            assert a == b == [b"update-1"]  # the very same bytes, relayed untouched
            await fanout.unwatch("s1", a.append)
            assert await subscribers(client, channel) == 1
            await fanout.unwatch("s1", b.append)
            assert fanout.watching() == 0
            await eventually(lambda: subscribed(client, channel, 0), what="unsubscribed after the last")
            await client.publish(channel, b"update-2")
            await fanout.watch("s2", a.append)
            await client.publish(keys.channel("s2"), b"other")
            await eventually(lambda: len(a) == 2, what="second update relayed")
            assert a == [b"update-1", b"other"] and b == [b"update-1"]
    finally:
        await client.aclose()


async def test_a_dropped_pubsub_connection_resubscribes_and_reports_the_gap(
    redis_url: str, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    name = f"fanout-test-{key_prefix.strip(':').replace(':', '-')}"
    async with gapped(redis_url, key_prefix, name) as g:
        await g.fanout.watch("s1", g.got.append)
        await g.fanout.watch("s2", g.got.append)
        assert g.gaps == []
        ids = [c["id"] for c in await g.client.client_list() if c.get("name") == name]
        assert len(ids) == 1
        await g.client.client_kill_filter(_id=ids[0])
        await eventually(lambda: g.gaps, what="the gap reported after the reconnect")
        assert sorted(g.gaps[0]) == ["s1", "s2"]
        # subscribed again before the gap was reported: a new update arrives
        await g.client.publish(keys.channel("s1"), b"after")
        await eventually(lambda: g.got == [b"after"], what="relay after the reconnect")


async def test_a_socket_that_joined_while_its_sessions_first_subscribe_was_cut_still_gets_updates(
    redis_url: str, key_prefix: str
) -> None:
    """A second socket joined while the first one's SUBSCRIBE waited (another session's was on the
    wire); the first client went away before its SUBSCRIBE was sent. The second must still end up
    subscribed (it used to stay registered with no subscription: a silent stale socket)."""
    from types import SimpleNamespace

    import anyio

    from kairos import apply, wire
    from tests.core.helpers import T0, make_create
    from web.ws import Relays, Socket

    state = apply(None, make_create(), T0).state
    sid = state.session_id
    channel = Keys(key_prefix).channel(sid)
    client = aioredis.from_url(redis_url)
    try:
        async with FanOut(client, key_prefix=key_prefix) as fanout, anyio.create_task_group() as tg:
            relays = Relays(SimpleNamespace(fanout=fanout))  # type: ignore[arg-type]
            first, second = Socket(8), Socket(8)
            await fanout._lock.acquire()  # another session's (un)subscribe is on the wire
            cut = anyio.CancelScope()
            joined = anyio.Event()

            async def join_first() -> None:
                with cut:
                    await relays.join(sid, first)

            async def join_second() -> None:
                await relays.join(sid, second)
                joined.set()

            tg.start_soon(join_first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(join_second)
            await anyio.wait_all_tasks_blocked()
            cut.cancel()  # the first client went away while its join waited
            await anyio.wait_all_tasks_blocked()
            await relays.leave(sid, first)  # as the endpoint does on the way out
            fanout._lock.release()
            with anyio.fail_after(5):
                await joined.wait()
            await eventually(lambda: subscribed(client, channel, 1), within=5, what="the session subscribed")
            await client.publish(channel, wire.update_message(state, [], T0, sid))
            assert second.recv_stream is not None
            with anyio.fail_after(5):
                frame = await second.recv_stream.receive()
            assert '"STATE_UPDATE"' in frame
    finally:
        await client.aclose()


async def test_an_unexpected_read_error_reconnects_and_reports_the_gap(redis_url: str, key_prefix: str) -> None:
    """redis-py can raise something other than a connection error when a connection is torn down
    under a read. The relay must not stop for good (every socket of the instance left silent):
    it reconnects, resubscribes and reports the gap."""
    keys = Keys(key_prefix)
    async with gapped(redis_url, key_prefix) as g:
        await g.fanout.watch("s1", g.got.append)
        pubsub = g.fanout._pubsub
        assert pubsub is not None
        read = pubsub.get_message
        failed: list[bool] = []

        async def fails_once(*args: object, **kwargs: object) -> object:
            if not failed:
                failed.append(True)
                raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; "
                                   "the handler is closed")
            return await read(*args, **kwargs)

        pubsub.get_message = fails_once  # type: ignore[method-assign]
        await eventually(lambda: g.gaps, what="the gap reported after the reconnect")
        assert g.gaps[0] == ["s1"]
        await eventually(lambda: subscribed(g.client, keys.channel("s1"), 1), what="resubscribed")
        await g.client.publish(keys.channel("s1"), b"after")
        await eventually(lambda: g.got == [b"after"], what="relay after the reconnect")
