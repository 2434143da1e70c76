"""actors/fanout.py against a real Redis: one subscription per watched session, relayed bytes."""

from __future__ import annotations

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
    watcher = aioredis.from_url(redis_url, client_name=name)
    client = aioredis.from_url(redis_url)
    got: list[bytes] = []
    gaps: list[list[str]] = []

    async def on_gap(sessions: list[str]) -> None:
        gaps.append(sessions)

    try:
        async with FanOut(watcher, key_prefix=key_prefix, on_gap=on_gap) as fanout:
            await fanout.watch("s1", got.append)
            await fanout.watch("s2", got.append)
            assert gaps == []
            ids = [c["id"] for c in await client.client_list() if c.get("name") == name]
            assert len(ids) == 1
            await client.client_kill_filter(_id=ids[0])
            await eventually(lambda: gaps, what="the gap reported after the reconnect")
            assert sorted(gaps[0]) == ["s1", "s2"]
            # subscribed again before the gap was reported: a new update arrives
            await client.publish(keys.channel("s1"), b"after")
            await eventually(lambda: got == [b"after"], what="relay after the reconnect")
    finally:
        await client.aclose()
        await watcher.aclose()
