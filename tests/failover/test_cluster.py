"""Kairos on a Redis Cluster: three real masters (redis-server processes), two `kairos serve`
given KAIROS_REDIS_CLUSTER_NODES. Sessions spread over partitions on every master are created,
started, switched through the instance that does not own them (forwarded) and many at once on
their owner (pipelined writes), watched over WebSocket, audited, and expire; the owner is SIGKILLed and its sessions are taken over."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from actors.keys import Keys
from bench.redis_topology import Clustered, Node
from tests.failover.conftest import Cluster
from tests.failover.kit import Watcher, create_running, owner_of, total_cycles, wait_until
from tests.servers import server_env

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

LEASE_TTL_MS = 1000
PARTITIONS = 16


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clustered]:
    with Clustered(Path(tmp_path_factory.mktemp("redis-cluster")), masters=3, appendfsync=None) as c:
        yield c


@pytest.fixture(scope="module")
def kairos(redis_cluster: Clustered, database_url: str) -> Iterator[Cluster]:
    prefix = f"kc:{uuid.uuid4().hex[:10]}:"
    env = server_env("unused", database_url, prefix, KAIROS_REDIS_CLUSTER_NODES=redis_cluster.nodes_setting,
                     KAIROS_LEASE_TTL_MS=str(LEASE_TTL_MS), KAIROS_RATE_LIMIT_GENERAL="0",
                     KAIROS_RATE_LIMIT_SWITCH="0")
    del env["KAIROS_REDIS_URL"]
    c = Cluster(env, n=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@asynccontextmanager
async def client(c: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers=c.headers(), timeout=15) as http:
        yield http


async def test_sessions_on_every_master_run_forwarded_watched_audited_and_taken_over(
        redis_cluster: Clustered, kairos: Cluster) -> None:
    a, b = kairos.servers
    keys = Keys(kairos.env["KAIROS_KEY_PREFIX"], PARTITIONS)
    admin = kairos.headers(admin=True)
    async with client(kairos) as http:
        sids: list[str] = []
        masters: set[Node] = set()
        while len(sids) < 12 or len(masters) < 3:  # 12 random sessions miss a master ~3% of the time
            assert len(sids) < 60, "sessions over 16 partitions reach every master"
            sids.append((await create_running(http, a.url))["session_id"])
            masters.add(redis_cluster.master_of_key(keys.lease(sids[-1])))
        for sid in sids:  # each session's keys and its partition's outbox on the slot's master
            node = redis_cluster.master_of_key(keys.lease(sid)).client
            assert node.exists(keys.lease(sid), keys.checkpoint(sid)) == 2
            assert node.exists(keys.outbox_of(keys.partition(sid))) == 1
        assert len({keys.partition(sid) for sid in sids}) > 3
        watched = sids[0]
        watcher = Watcher(watched, [b.ws_url], kairos.user)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await watcher.connected.wait()
            for sid in sids:  # b owns none of them: each switch is forwarded to a
                r = await http.post(f"{b.url}/v1/sessions/{sid}/switch", json={})
                assert r.status_code == 200, r.text
                assert r.json()["data"]["version"] == 3
            await wait_until(lambda: 3 in watcher.versions, 10, "the forwarded switch over WebSocket on b")
            watcher.stopped = True
            tg.cancel_scope.cancel()
        # concurrent switches on the owner: its writes leave together in pipelines (one per node)
        answers: list[int] = []

        async def switch(sid: str) -> None:
            answers.append((await http.post(f"{a.url}/v1/sessions/{sid}/switch", json={})).status_code)

        async with anyio.create_task_group() as tg:
            for sid in sids * 3:
                tg.start_soon(switch, sid)
        assert answers == [200] * len(sids) * 3
        for sid in sids:
            assert await owner_of(http, b.url, sid, admin) == a.env["KAIROS_INSTANCE_ID"]
            state = (await http.get(f"{b.url}/v1/sessions/{sid}")).json()["data"]
            assert state["version"] == 6 and total_cycles(state) == 4

        async def audited() -> bool:
            r = await http.get(f"{b.url}/v1/sessions/{sids[-1]}/events")
            return r.status_code == 200 and len({e["version"] for e in r.json()["data"]}) == 6

        await wait_until(audited, 10, "the audit read every partition's outbox")

        # a short session expires on time, watched from b
        short = (await create_running(http, a.url, bank_ms=1500))["session_id"]
        watcher = Watcher(short, [b.ws_url], kairos.user)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await watcher.connected.wait()
            await wait_until(lambda: watcher.of_type("TIME_EXPIRED"), 10, "TIME_EXPIRED on b")
            watcher.stopped = True
            tg.cancel_scope.cancel()

        # the owner dies: a running session still expires (b's sweeper adopts it from its
        # partition) and a switch through b takes the others over
        doomed = (await create_running(http, a.url, bank_ms=2500))["session_id"]
        a.kill()
        killed = time.monotonic()
        for sid in sids[:4]:
            r = await http.post(f"{b.url}/v1/sessions/{sid}/switch", json={})
            assert r.status_code == 200, r.text
            assert r.json()["data"]["version"] == 7
        assert time.monotonic() - killed < 4 * LEASE_TTL_MS / 1000 + 2

        async def expired() -> bool:
            r = await http.get(f"{b.url}/v1/sessions/{doomed}")
            return r.json()["data"]["status"] == "expired"

        await wait_until(expired, 2.5 + 5, "the dead owner's running session expires")
        assert await owner_of(http, b.url, doomed, admin) == b.env["KAIROS_INSTANCE_ID"]
