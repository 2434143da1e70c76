"""What KAIROS_REDIS_MIN_REPLICAS_ACK guarantees when the master dies with writes its replica
never got: a master, one replica and three sentinels of the test's own, one host following them.

The replica is cut off (frozen, its link killed) while a switch is sent, then the master is
SIGKILLed and the replica promoted. With 0 the switch is acknowledged and then lost (the
documented risk of asynchronous replication); with 1 it is answered 503 and never acknowledged,
so nothing acknowledged is lost."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from actors.connection import open_redis
from actors.host import Host
from actors.keys import Keys
from bench.redis_topology import Replicated
from kairos import codec
from kairos.commands import Start, Switch
from kairos.errors import Unavailable
from tests.runtime.conftest import create_command
from tests.waiting import eventually, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.mark.parametrize("min_replicas_ack", [0, 1])
async def test_a_switch_the_replica_never_got(tmp_path: Path, key_prefix: str, min_replicas_ack: int) -> None:
    with Replicated(tmp_path, replicas=1, sentinels=3) as topo:
        assert topo.master is not None
        replica, old_master = topo.replicas[0], topo.announced_master()
        client = open_redis(topo.sentinel_url)
        sid = str(uuid.uuid4())
        try:
            async with Host(client, key_prefix=key_prefix, min_replicas_ack=min_replicas_ack,
                            lease_ttl_ms=10_000, ask_deadline_ms=3000) as h:
                await h.ask(sid, create_command(sid))
                replicated = (await h.ask(sid, Start())).outcome["version"]
                # cut the replica off: frozen, and its link closed by the master (no resync later)
                replica.signal(signal.SIGSTOP)
                topo.master.client.client_kill_filter(_type="replica")
                wait_for(lambda: topo.master.client.info("replication")["connected_slaves"] == 0, 10, "cut off")
                try:
                    acked = (await h.ask(sid, Switch(command_id="unreplicated"))).outcome["version"]
                except Unavailable:
                    acked = None
                topo.kill_master()
                replica.signal(signal.SIGCONT)
                wait_for(lambda: topo.announced_master() != old_master, 30, "the replica promoted")
        finally:
            await client.aclose()
        promoted = aioredis.Redis(host="127.0.0.1", port=topo.announced_master())
        try:
            durable = codec.decode(await eventually(
                lambda: promoted.get(Keys(key_prefix).checkpoint(sid)), 10, "the checkpoint")).version
        finally:
            await promoted.aclose()
    assert durable == replicated  # the promoted replica has what it had before it was cut off
    if min_replicas_ack:
        assert acked is None  # never acknowledged: nothing acknowledged is lost
    else:
        assert acked == replicated + 1  # acknowledged ... and lost by the failover
