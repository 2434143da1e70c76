"""Every Redis write is safe to repeat (issue 9, defect 4): a command whose reply was lost and that
is sent again (by redis-py's retry, or by us) changes nothing twice, and a forwarded command whose
inbox pop reply was lost is still served. Real Redis; lost replies come from a real proxy."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from actors.host import Host
from actors.keys import ALREADY_WRITTEN, INBOX_TTL_MS, POPPED_KEEP, Keys, Scripts
from actors.router import CLAIMED, FORWARDED
from kairos.commands import Start, Switch
from kairos.session import Status
from tests.runtime.conftest import create_command, hosts
from tests.runtime.lossy_proxy import LossyProxy

pytestmark = pytest.mark.anyio

TTL = 10_000


def retrying(url: str) -> aioredis.Redis:
    """A client that re-sends a command after a connection error (redis-py's own retry)."""
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 2))


async def outbox_versions(redis: Any, keys: Keys) -> list[int]:
    return [json.loads(fields[b"m"])["version"] for _, fields in await redis.xrange(keys.outbox)]


async def claimed(redis: Any, key_prefix: str) -> tuple[Keys, Scripts, str, str]:
    """Keys, scripts, a live incarnation and a session it just claimed (epoch 1)."""
    keys = Keys(key_prefix)
    scripts = Scripts(redis, keys)
    inc, sid = uuid.uuid4().hex, str(uuid.uuid4())
    assert await scripts.do_join(inc, b"{}", TTL)
    assert (await scripts.do_claim_or_forward(inc, sid, may_claim=True))[0] == CLAIMED
    return keys, scripts, inc, sid


async def test_a_fenced_write_sent_twice_is_queued_and_published_once(redis: Any, key_prefix: str) -> None:
    keys, scripts, inc, sid = await claimed(redis, key_prefix)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.channel(sid))
    try:
        args = (inc, 1, sid, b"cp-v1", b'{"version":1}', None)
        assert await scripts.do_fenced_write(*args, version=1) == 1
        assert await scripts.do_fenced_write(*args, version=1) == ALREADY_WRITTEN
        assert await scripts.do_fenced_write(inc, 1, sid, b"cp-v2", b'{"version":2}', None, version=2) == 1
        assert await scripts.do_fenced_write(inc, 1, sid, b"cp-v4", b'{"version":4}', None, version=4) == 0
        assert await redis.get(keys.checkpoint(sid)) == b"cp-v2"
        assert await outbox_versions(redis, keys) == [1, 2]
        await redis.publish(keys.channel(sid), b'{"version":"end"}')  # after everything above
        published = []
        with anyio.fail_after(10):
            while not published or published[-1] != "end":
                m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if m is not None:
                    published.append(json.loads(m["data"])["version"])
        assert published == [1, 2, "end"]
    finally:
        await pubsub.aclose()


async def test_a_delete_sent_twice_is_queued_once_and_answered_already_deleted(redis: Any, key_prefix: str) -> None:
    keys, scripts, inc, sid = await claimed(redis, key_prefix)
    assert await scripts.do_fenced_write(inc, 1, sid, b"cp", b'{"version":1}', None, version=1) == 1
    assert await scripts.do_fenced_delete(inc, 1, sid, b'{"version":2}') == 1
    assert await scripts.do_fenced_delete(inc, 1, sid, b'{"version":2}') == ALREADY_WRITTEN
    assert await outbox_versions(redis, keys) == [1, 2]
    # created again afterwards: version 1 over nothing
    r = await scripts.do_claim_or_forward(inc, sid, may_claim=True)
    assert r[0] == CLAIMED
    assert await scripts.do_fenced_write(inc, int(r[1]), sid, b"cp", b'{"version":1}', None, version=1) == 1


async def test_a_command_whose_write_reply_was_lost_is_written_once(redis_url: str, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    async with LossyProxy(redis_url) as proxy:
        client = retrying(proxy.url)
        try:
            async with Host(client, key_prefix=key_prefix, lease_ttl_ms=TTL) as host:
                sid = str(uuid.uuid4())
                await host.ask(sid, create_command(sid))
                await host.ask(sid, Start())
                proxy.lose_reply(after=sid.encode())  # the next request naming it: the fenced write
                reply = await host.ask(sid, Switch(command_id="k1"))
                assert proxy.lost == 1
                assert reply.state is not None and reply.state.version == 3
                assert await outbox_versions(client, keys) == [1, 2, 3]
                # the actor kept going: the next command is version 4, once
                await host.ask(sid, Switch())
                assert await outbox_versions(client, keys) == [1, 2, 3, 4]
        finally:
            await client.aclose()


async def test_a_forwarded_command_whose_pop_reply_was_lost_is_still_served(
    redis: Any, redis_url: str, key_prefix: str
) -> None:
    async with LossyProxy(redis_url) as proxy:
        owner_client = retrying(proxy.url)
        try:
            async with (Host(owner_client, key_prefix=key_prefix, lease_ttl_ms=TTL) as owner,
                        hosts(redis, key_prefix, 1, lease_ttl_ms=TTL, forward_timeout_ms=1000,
                              ask_deadline_ms=4000) as (asker,)):
                sid = str(uuid.uuid4())
                await owner.ask(sid, create_command(sid))
                marker = f"lost-pop-{uuid.uuid4().hex}"
                proxy.lose_reply(containing=marker.encode())  # the owner's inbox read of it
                reply = await asker.ask(sid, Start(command_id=marker))
                assert proxy.lost == 1
                assert reply.state is not None and reply.state.status is Status.RUNNING
                assert owner.is_local(sid) and reply.state.version == 2
        finally:
            await owner_client.aclose()


async def test_inbox_reads_whose_replies_were_lost_are_read_again(redis_url: str, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    async with LossyProxy(redis_url) as proxy:
        client = retrying(proxy.url)
        scripts = Scripts(client, keys)
        inc = uuid.uuid4().hex
        try:
            entries = [b"entry-one", b"entry-two", b"entry-three"]  # markers no other reply holds
            await client.rpush(keys.inbox(inc), *entries)
            proxy.lose_reply(containing=b"entry-one")
            with pytest.raises(RedisConnectionError):
                await scripts.do_pop_inbox_batch(inc, 10)
            assert await scripts.do_pop_inbox_batch(inc, 10) == entries
            assert await scripts.do_pop_inbox_batch(inc, 10) == []
            await client.rpush(keys.inbox(inc), b"entry-four")
            proxy.lose_reply(containing=b"entry-four")
            with pytest.raises(RedisConnectionError):
                await scripts.do_pop_inbox(inc, 1)
            assert await scripts.do_pop_inbox(inc, 1) == [b"entry-four"]
            assert await scripts.do_pop_inbox(inc, 1) == []
            assert proxy.lost == 2
        finally:
            await scripts.aclose()
            await client.aclose()


async def test_the_popped_list_stays_short_and_goes_with_its_incarnation(redis: Any, key_prefix: str) -> None:
    keys, scripts, owner, sid = await claimed(redis, key_prefix)
    asker = uuid.uuid4().hex
    assert await scripts.do_join(asker, b"{}", TTL)
    try:
        await redis.rpush(keys.inbox(owner), *[f"e{n}".encode() for n in range(300)])
        assert len(await scripts.do_pop_inbox_batch(owner, 300)) == 300
        assert await redis.llen(keys.inbox_popped(owner)) == POPPED_KEEP  # the batch read trims
        assert await scripts.do_pop_inbox(owner, 1) == []  # nothing queued: nothing moves
        await redis.lpush(keys.inbox_popped(owner), *[b"x"] * 50)  # as 50 single reads would
        assert (await scripts.do_claim_or_forward(asker, sid, may_claim=True, payload=b"p"))[0] == FORWARDED
        assert await redis.llen(keys.inbox_popped(owner)) == POPPED_KEEP  # a forward trims too
        assert 0 < await redis.pttl(keys.inbox_popped(owner)) <= INBOX_TTL_MS
        await scripts.do_leave(owner)
        await scripts.do_list_instances()  # prunes the dead incarnation, and its popped list
        assert not await redis.exists(keys.inbox_popped(owner))
    finally:
        await scripts.aclose()
