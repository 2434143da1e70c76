"""actors/fanout.py against a real Redis: one subscription per watched session, relayed bytes."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from actors.fanout import FanOut
from actors.keys import Keys

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def subscribers(client: aioredis.Redis, channel: str) -> int:
    return dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0)


async def wait_until(cond, timeout_s: float = 5.0) -> None:  # noqa: ANN001
    with anyio.fail_after(timeout_s):
        while not await cond():  # noqa: ASYNC110 - polling a condition with a timeout
            await anyio.sleep(0.01)


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
            assert await subscribers(client, channel) == 1  # one connection, one subscription
            await client.publish(channel, b"update-1")
            await wait_until(lambda: _async(len(a) == 1 and len(b) == 1))
            assert a == b == [b"update-1"]  # the very same bytes, relayed untouched
            await fanout.unwatch("s1", a.append)
            assert await subscribers(client, channel) == 1
            await fanout.unwatch("s1", b.append)
            assert await subscribers(client, channel) == 0 and fanout.watching() == 0
            await client.publish(channel, b"update-2")
            await fanout.watch("s2", a.append)
            await client.publish(keys.channel("s2"), b"other")
            await wait_until(lambda: _async(len(a) == 2))
            assert a == [b"update-1", b"other"] and b == [b"update-1"]
    finally:
        await client.aclose()


async def _async(value: bool) -> bool:
    return value
