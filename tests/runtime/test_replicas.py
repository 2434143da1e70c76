"""KAIROS_REDIS_MIN_REPLICAS_ACK: a write or claim counts only once a replica has it.

A master and one replica of the test's own; freezing the replica (SIGSTOP) makes the master's
WAIT time out: the command is answered 503, nothing is published, and the claim is given back."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.host import Host
from actors.keys import REPLICA_WAIT_MS, Keys
from bench.redis_topology import Replicated
from kairos.commands import Start, Switch
from kairos.errors import Unavailable
from tests.runtime.conftest import create_command

pytestmark = pytest.mark.anyio


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Replicated]:
    with Replicated(tmp_path, replicas=1) as t:
        yield t


async def _published(client: Any, channel: str) -> Any:
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    return pubsub


async def test_a_write_no_replica_confirms_is_answered_503_and_never_published(
        topo: Replicated, key_prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(topo.master_url)
    replica = topo.replicas[0]
    keys = Keys(key_prefix)
    try:
        async with Host(client, key_prefix=key_prefix, min_replicas_ack=1, ask_deadline_ms=3000) as h:
            sid = str(uuid.uuid4())
            await h.ask(sid, create_command(sid))
            started = await h.ask(sid, Start())
            # acknowledged means on the replica already
            assert replica.client.get(keys.checkpoint(sid)) == await client.get(keys.checkpoint(sid))
            watch = await _published(client, keys.channel(sid))
            replica.signal(signal.SIGSTOP)
            try:
                with pytest.raises(Unavailable):
                    await h.ask(sid, Switch(command_id="while-frozen"))
                assert await watch.get_message(timeout=REPLICA_WAIT_MS / 1000) is None  # not published
            finally:
                replica.signal(signal.SIGCONT)
            # the actor dropped its memory: it reloads what Redis has (here the write did land on
            # the master), and the retried key is answered from the idempotency window, once
            again = await h.ask(sid, Switch(command_id="while-frozen"))
            assert again.outcome["version"] == started.outcome["version"] + 1
            assert (await h.ask(sid, Switch(command_id="next"))).outcome["version"] == again.outcome["version"] + 1
            assert replica.client.get(keys.checkpoint(sid)) == await client.get(keys.checkpoint(sid))
            await watch.aclose()
    finally:
        await client.aclose()


async def test_a_claim_no_replica_confirms_is_given_back(topo: Replicated, key_prefix: str) -> None:
    import redis.asyncio as aioredis

    from actors.keys import ReplicationTimeout, Scripts

    client = aioredis.Redis.from_url(topo.master_url)
    replica = topo.replicas[0]
    scripts = Scripts(client, Keys(key_prefix), min_replicas_ack=1)
    inc = uuid.uuid4().hex
    try:
        await scripts.do_join(inc, b"{}", 10_000)
        sid = str(uuid.uuid4())
        replica.signal(signal.SIGSTOP)
        try:
            with pytest.raises(ReplicationTimeout):
                await scripts.do_claim_or_forward(inc, sid, may_claim=True)
        finally:
            replica.signal(signal.SIGCONT)
        assert await scripts.do_read_lease(sid) == ("", 1)  # released, epoch kept: never reused
        claimed = await scripts.do_claim_or_forward(inc, sid, may_claim=True)
        assert claimed[:2] == [1, 2]
        assert replica.client.hget(Keys(key_prefix).lease(sid), "e") == b"2"  # replicated before the answer
    finally:
        await client.aclose()
