"""Kairos on a Redis Cluster: three masters started by the test, three real `kairos serve`
processes on it (KAIROS_REDIS_URL=redis+cluster://...).

The module's `redis_url` is the cluster, so the failover suite's instances (`cluster`/`healthy`
of conftest.py) run on it and the tests imported below run unchanged: a REST and WebSocket
contract subset, and the owner-SIGKILL / expiry / drain failover tests. Its own tests: sessions
spread over every master served through any instance, and a live slot migration under switching
traffic that loses no acknowledged switch and applies none twice."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import anyio
import httpx
import pytest

from actors.keys import Keys
from bench.redis_topology import Clustered, slot_of
from tests.failover.conftest import Cluster
from tests.failover.kit import Switcher, create_running, total_cycles, wait_until
from tests.failover.test_failover import (  # noqa: F401 (collected here: the failover suite on the cluster)
    test_drain_hands_every_session_off_with_no_failed_request,
    test_expiry_fires_after_sigkill_of_the_owner_with_no_client_activity,
    test_sigkill_of_the_owner_loses_no_acknowledged_switch,
)
from tests.servers import KairosServer
from tests.waiting import wait_for
from tests.web.conftest import bearer
from tests.web.test_web_rest import (  # noqa: F401 (collected here: the REST contract on the cluster)
    test_create_existing_id_is_409_but_idempotent_retry_returns_first,
    test_create_returns_201_with_exact_shape,
    test_delete_is_204_and_idempotent,
    test_events_history_oldest_first_with_paging,
    test_get_bad_id_is_400_and_unknown_is_404,
    test_get_reports_live_remaining_time,
    test_start_pause_resume_complete_and_invalid_transitions,
    test_switch_expected_active_mismatch_is_409,
    test_switch_result_shape_and_version,
    test_switch_with_same_idempotency_key_applies_once,
)
from tests.web.test_web_ws import (  # noqa: F401 (collected here: the WebSocket contract on the cluster)
    test_change_through_one_instance_reaches_a_socket_on_the_other,
    test_commands_over_the_socket_answer_ack_or_error,
    test_connected_then_updates_sync_and_pong,
    test_delete_sends_session_deleted_then_closes_1000,
    test_server_made_expiry_sends_warning_then_expired_then_update,
)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clustered]:
    # no AOF: nothing restarts a node here, and fsync on every write stalls a node on a loaded
    # box long enough (> TTL/10 per renewal attempt) for an instance to lose its liveness
    with Clustered(tmp_path_factory.mktemp("redis-cluster"), masters=3, appendfsync=None) as c:
        yield c


@pytest.fixture(scope="module")
def redis_url(redis_cluster: Clustered) -> str:
    """This module's Redis is the cluster (conftest's instances are started on it)."""
    return redis_cluster.url


@pytest.fixture
def server(healthy: Cluster) -> KairosServer:
    """The contract tests' server: one instance of the three."""
    return healthy.servers[0]


@pytest.fixture
def server_b(healthy: Cluster) -> KairosServer:
    """The contract tests' second instance."""
    return healthy.servers[1]


@pytest.fixture
def http(server: KairosServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=bearer(server.token("host-1")), timeout=10) as c:
        yield c


def _keys(healthy: Cluster, redis_cluster: Clustered) -> Keys:
    """The deployment's key names, for the partition count the instances recorded in Redis."""
    layout = Keys(healthy.env["KAIROS_KEY_PREFIX"]).layout
    partitions = int(redis_cluster.master_of_key(layout).client.get(layout))
    return Keys(healthy.env["KAIROS_KEY_PREFIX"], partitions)


async def test_sessions_on_every_master_are_served_through_every_instance(
        healthy: Cluster, redis_cluster: Clustered) -> None:
    servers, keys = healthy.servers, _keys(healthy, redis_cluster)
    async with httpx.AsyncClient(headers=healthy.headers(), timeout=15) as http:
        sids = [(await create_running(http, servers[i % 3].url))["session_id"] for i in range(24)]
        masters = {redis_cluster.master_of_key(keys.checkpoint(sid)).port for sid in sids}
        assert masters == {m.port for m in redis_cluster.masters}  # every master holds sessions
        for i, sid in enumerate(sids):  # switched through another instance than the owner's
            r = await http.post(f"{servers[(i + 1) % 3].url}/v1/sessions/{sid}/switch")
            assert r.status_code == 200, r.text
            got = (await http.get(f"{servers[(i + 2) % 3].url}/v1/sessions/{sid}")).json()["data"]
            assert (got["version"], total_cycles(got)) == (3, 1)


async def test_a_slot_migration_under_traffic_loses_no_acknowledged_switch(
        healthy: Cluster, redis_cluster: Clustered) -> None:
    urls, keys = [s.url for s in healthy.servers], _keys(healthy, redis_cluster)
    async with httpx.AsyncClient(headers=healthy.headers(), timeout=15) as http:
        sids = [(await create_running(http, urls[i % 3]))["session_id"] for i in range(6)]
        slots = sorted({slot_of(keys.checkpoint(sid)) for sid in sids})
        owners = {slot: redis_cluster.master_of_slot(slot) for slot in slots}
        masters = redis_cluster.masters
        targets = {slot: masters[(masters.index(owners[slot]) + 1) % len(masters)] for slot in slots}
        switchers = [Switcher(http, sid, urls[i % 3:] + urls[:i % 3]) for i, sid in enumerate(sids)]

        def acked() -> int:
            return sum(len(s.acked) for s in switchers)

        def after_batch(moved: int) -> None:  # keys move a few at a time, switches in between
            base = acked()
            wait_for(lambda: acked() >= base + 6, 20, "switches between two migration batches")

        def migrate() -> int:
            return sum(redis_cluster.migrate_slots([slot], targets[slot], batch=3, between=after_batch)
                       for slot in slots)

        async with anyio.create_task_group() as tg:
            for s in switchers:
                tg.start_soon(s.run)
            await wait_until(lambda: all(len(s.acked) >= 5 for s in switchers), 20, "switches before")
            started = time.monotonic()
            moved = await anyio.to_thread.run_sync(migrate)
            migrated = time.monotonic()
            await wait_until(lambda: all(s.acks_after(migrated) >= 5 for s in switchers), 20,
                             "switches after the migration")
            for s in switchers:
                await s.stop()
            tg.cancel_scope.cancel()
        finals = [(await http.get(f"{urls[0]}/v1/sessions/{sid}")).json()["data"] for sid in sids]
    retried = Counter(f.split(" ", 2)[1] if " " in f else f for s in switchers for f in s.failures)
    print(f"\nslot migration: {len(slots)} slots, {moved} keys moved in {migrated - started:.2f} s; "
          f"{acked()} switches acknowledged; attempts retried: {dict(retried) or 0}")
    odd = [f for s in switchers for f in s.failures if " 503 " not in f]
    assert not odd, odd  # a migration is waited out (503, retried), never a server error
    assert all(redis_cluster.master_of_slot(slot) is targets[slot] for slot in slots)
    assert moved >= 2 * len(sids)  # at least each session's checkpoint and lease moved
    for s, final in zip(switchers, finals, strict=True):
        versions = [v for _, v in s.acked]
        assert versions == list(range(3, 3 + len(versions)))  # contiguous: none lost, none reissued
        assert final["version"] == 2 + len(versions)
        assert total_cycles(final) == len(versions)  # every key applied exactly once
