"""KAIROS_REDIS_MIN_REPLICAS_ACK on a Redis Cluster: a write's WAIT goes to the master that took
it, on the connection that carried it. Three masters with a replica each, one host: with one
master's replica cut off, a switch of a session on that master is answered 503 (never
acknowledged) while a session on another master is still acknowledged; once the replica is back,
that session's switches are acknowledged again."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from actors.connection import open_redis
from actors.host import Host
from actors.keys import Keys
from bench.redis_topology import Clustered
from kairos.commands import Start, Switch
from kairos.errors import Unavailable
from tests.runtime.conftest import create_command
from tests.waiting import eventually, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

PARTITIONS = 16


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_write_waits_for_the_replica_of_its_own_master(tmp_path: Path, key_prefix: str) -> None:
    with Clustered(tmp_path, masters=3, replicas=1, appendfsync=None) as cluster:
        client = open_redis(cluster.url)
        keys = Keys(key_prefix, PARTITIONS)
        try:
            async with Host(client, key_prefix=key_prefix, partitions=PARTITIONS, min_replicas_ack=1,
                            lease_ttl_ms=10_000, ask_deadline_ms=3000) as h:
                sids = [str(uuid.uuid4()) for _ in range(12)]
                for sid in sids:  # every claim and write confirmed by its master's replica
                    await h.ask(sid, create_command(sid))
                    await h.ask(sid, Start())
                home = {sid: cluster.master_of_key(keys.lease(sid)) for sid in sids}
                cut, master = sids[0], home[sids[0]]
                spared = next(sid for sid in sids if home[sid] is not master)
                replica = cluster.replicas[cluster.masters.index(master)]
                replica.signal(signal.SIGSTOP)
                try:
                    master.client.client_kill_filter(_type="replica")
                    wait_for(lambda: master.client.info("replication")["connected_slaves"] == 0, 10, "cut off")
                    with pytest.raises(Unavailable):
                        await h.ask(cut, Switch(command_id="unconfirmed"))
                    await h.ask(spared, Switch(command_id="confirmed"))  # its master's replica has it
                finally:
                    replica.signal(signal.SIGCONT)
                wait_for(lambda: master.client.info("replication").get("slave0", {}).get("state") == "online",
                         20, "the replica back")

                async def switched() -> bool:
                    try:
                        await h.ask(cut, Switch(command_id="confirmed again"))
                    except Unavailable:
                        return False
                    return True

                await eventually(switched, 10, "a switch acknowledged again")
        finally:
            await client.aclose()
