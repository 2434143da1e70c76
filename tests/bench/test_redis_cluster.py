"""The Redis Cluster kit of bench/redis_topology.py on real `redis-server` processes: a 3-master
cluster comes up with every slot served, a slot full of keys moves to another master while a
client keeps incrementing them (nothing acknowledged is lost), and a killed master's replica is
promoted."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from bench.redis_topology import Clustered, slot_of, tag_for_slot
from tests.waiting import eventually, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(cluster: Clustered) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", m.port) for m in cluster.masters])


async def test_a_slot_moves_with_its_keys_while_a_client_writes_them(tmp_path: Path) -> None:
    with Clustered(tmp_path, masters=3) as cluster:
        assert len({cluster.node_id(m) for m in cluster.masters}) == 3
        assert all(cluster.slots_of(m) for m in cluster.masters)  # every master serves slots
        client = _client(cluster)
        try:
            spread = {f"k:{i}": str(i) for i in range(300)}
            await client.mset_nonatomic(spread)
            assert {cluster.master_of_key(k).port for k in spread} == {m.port for m in cluster.masters}
            slot = slot_of("k:0")
            tag = tag_for_slot(slot)
            counters = [f"c:{tag}:{i}" for i in range(60)]
            assert {slot_of(k) for k in counters} == {slot}
            for k in counters:
                await client.set(k, 0)
            source = cluster.master_of_slot(slot)
            target = next(m for m in cluster.masters if m is not source)
            acked = dict.fromkeys(counters, 0)
            done = threading.Event()

            def after_batch(moved: int) -> None:  # the client keeps writing between batches
                base = sum(acked.values())
                wait_for(lambda: sum(acked.values()) >= base + 30, 20, "increments during the migration")

            async def writer() -> None:
                i = 0
                while not done.is_set():
                    k = counters[i % len(counters)]
                    await client.incr(k)
                    acked[k] += 1
                    i += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                moved = await anyio.to_thread.run_sync(
                    lambda: cluster.migrate_slots([slot], target, batch=20, between=after_batch))
                await eventually(lambda: sum(acked.values()) >= 200, 20, "increments")
                done.set()
            assert moved >= len(counters)
            assert cluster.master_of_slot(slot) is target
            assert slot not in cluster.slots_of(source)
            assert [int(await client.get(k)) for k in counters] == [acked[k] for k in counters]
            assert [v.decode() for v in await client.mget_nonatomic(list(spread))] == list(spread.values())
        finally:
            await client.aclose()


@pytest.mark.slow
async def test_a_killed_master_is_replaced_by_its_replica(tmp_path: Path) -> None:
    with Clustered(tmp_path, masters=3, replicas=1) as cluster:
        client = _client(cluster)
        try:
            await client.set("survives", "yes")
            victim = cluster.master_of_key("survives")
            assert victim.client.wait(1, 5000) == 1  # on its replica before the kill
            slots = cluster.slots_of(victim)
            cluster.kill(victim)
            cluster.wait_ok()
            promoted = cluster.master_of_key("survives")
            assert promoted is not victim and promoted in cluster.replicas
            assert cluster.slots_of(promoted) == slots
            assert await eventually(lambda: client.get("survives"), 20, "the key via the promoted replica") == b"yes"
        finally:
            await client.aclose()
