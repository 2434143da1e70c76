"""Orphan adoption and drain at the runtime level (in-process hosts on a real Redis).

Real process death (SIGKILL/SIGSTOP of `kairos serve`) is covered by the failover suite; here the
owner leaves by deleting its liveness key (what a crash looks like to everyone else)."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from typing import Any

import anyio
import pytest

from actors.host import Host, rendezvous
from actors.keys import Keys
from kairos import rules
from kairos.commands import Start, Switch
from kairos.session import Status
from tests.runtime.conftest import create_command, hosts, wait_for

pytestmark = pytest.mark.anyio


async def test_orphaned_running_session_still_expires_on_time(redis: Any, key_prefix: str) -> None:
    ttl = 1000
    async with hosts(redis, key_prefix, 1, lease_ttl_ms=ttl) as (survivor,):
        sid = str(uuid.uuid4())
        async with hosts(redis, key_prefix, 1, lease_ttl_ms=ttl) as (owner,):
            await owner.ask(sid, create_command(sid, bank_ms=1500))
            started = await owner.ask(sid, Start())
            deadline = rules.next_deadline(started.state)
        # the owner is gone (its liveness key with it); nobody sends anything
        state = await wait_for(lambda: (a := survivor.local_actor(sid)) is not None
                               and a.state.status is Status.EXPIRED and a.state,
                               within=ttl / 1000 + 3, what="adopted expiry")
        assert survivor.sweeper.adopted >= 1
        assert state.updated_at_ms - deadline < 250  # adopted before its deadline: on time


async def test_drain_hands_every_session_off_without_failing_a_command(redis: Any, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    async with hosts(redis, key_prefix, 2, switch_rate_per_s=0) as (a, b):
        async with hosts(redis, key_prefix, 1, switch_rate_per_s=0) as (c,):
            sids = [str(uuid.uuid4()) for _ in range(20)]
            for sid in sids:
                await c.ask(sid, create_command(sid))
                await c.ask(sid, Start())
            assert c.actor_count() == 20
            acked: dict[str, list[int]] = defaultdict(list)
            errors: list[BaseException] = []
            draining_done = anyio.Event()

            async def client(sid: str, via: Host) -> None:
                while not draining_done.is_set():
                    try:
                        acked[sid].append((await via.ask(sid, Switch())).outcome["version"])
                    except Exception as e:  # any failure is a test failure
                        errors.append(e)
                        return
                for _ in range(3):  # and a few after the hand-off
                    acked[sid].append((await via.ask(sid, Switch())).outcome["version"])

            async with anyio.create_task_group() as tg:
                for i, sid in enumerate(sids):
                    tg.start_soon(client, sid, (a, b, c)[i % 3])
                await anyio.sleep(0.1)  # let traffic flow before draining (not a synchronisation)
                with anyio.fail_after(10):
                    await c.drain()
                draining_done.set()
            assert errors == []
            assert c.actor_count() == 0
            owners = {inc for inc, _ in [await a.scripts.do_read_lease(s) for s in sids]}
            assert owners <= {a.incarnation, b.incarnation}
            expected = {s: rendezvous(s, [a.incarnation, b.incarnation]) for s in sids}
            assert {s: (await a.scripts.do_read_lease(s))[0] for s in sids} == expected
            # a drained instance still serves: it hands new (unowned) sessions to their successor
            fresh = str(uuid.uuid4())
            assert (await c.ask(fresh, create_command(fresh))).outcome["version"] == 1
            assert c.actor_count() == 0
            assert (await c.scripts.do_read_lease(fresh))[0] == rendezvous(fresh, [a.incarnation, b.incarnation])
        versions: dict[str, list[int]] = defaultdict(list)
        for _, fields in await redis.xrange(keys.outbox):
            m = json.loads(fields[b"m"])
            versions[m["session_id"]].append(m["version"])
        for sid in sids:
            assert versions[sid] == list(range(1, len(versions[sid]) + 1))  # nothing lost or doubled
            assert sorted(acked[sid]) == list(range(3, versions[sid][-1] + 1))


async def test_sweeper_pages_past_many_live_sessions_to_find_an_orphan(redis: Any, key_prefix: str) -> None:
    from actors.sweeper import Sweeper

    async with hosts(redis, key_prefix, 2) as (live, sweeping):
        for _ in range(5):  # due before the orphan, owned by a live instance: not to be adopted
            sid = str(uuid.uuid4())
            await live.ask(sid, create_command(sid, bank_ms=20_000))
            await live.ask(sid, Start())
        orphan = str(uuid.uuid4())
        async with hosts(redis, key_prefix, 1) as (doomed,):
            await doomed.ask(orphan, create_command(orphan, bank_ms=40_000))
            await doomed.ask(orphan, Start())
        sweeper = Sweeper(sweeping, period_ms=1000, horizon_ms=60_000, scan=2, batch=10)
        for _ in range(4):
            await sweeper.sweep_once()
        assert sweeper.adopted == 1
        assert sweeping.local_actor(orphan) is not None
        assert live.actor_count() == 5
