"""The Redis Cluster variant of the lease scripts (each script on one slot: the session's step and
the instance's step are separate calls), run on one real Redis with `one_slot=True`: takeover only
of an owner seen dead, fencing by the lease alone, the owner hint, hand-off, adoption, membership,
the partition layout."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from redis.crc import key_slot

from actors.keys import Keys, Scripts, partition_tags
from actors.router import CLAIMED, FORWARDED, MINE, OWNED_ELSEWHERE, UNOWNED

pytestmark = pytest.mark.anyio

TTL = 10_000
PARTITIONS = 4


def one_slot(redis: Any, key_prefix: str) -> Scripts:
    return Scripts(redis, Keys(key_prefix, PARTITIONS), one_slot=True)


async def joined(scripts: Scripts, n: int) -> list[str]:
    incs = [uuid.uuid4().hex for _ in range(n)]
    for inc in incs:
        assert await scripts.do_join(inc, json.dumps({"incarnation": inc}).encode(), TTL)
    return incs


async def write(scripts: Scripts, inc: str, epoch: int, sid: str, body: bytes = b"cp",
                deadline_ms: int | None = None) -> int:
    return await scripts.do_fenced_write(inc, epoch, sid, body, b"msg", deadline_ms)


async def test_a_lease_is_taken_over_only_once_its_owner_is_seen_dead(redis: Any, key_prefix: str) -> None:
    scripts = one_slot(redis, key_prefix)
    keys = scripts.keys
    a, b = await joined(scripts, 2)
    sid = str(uuid.uuid4())
    r = await scripts.do_claim_or_forward(a, sid, may_claim=True)
    assert r[0] == CLAIMED and int(r[1]) == 1 and r[3] == b"new"
    assert await write(scripts, a, 1, sid, b"v1") == 1
    assert await redis.xlen(keys.outbox_of(keys.partition(sid))) == 1
    r = await scripts.do_claim_or_forward(b, sid, may_claim=True, payload=b"cmd")  # a lives: forwarded
    assert r[0] == FORWARDED and r[1].decode() == a and 0 < int(r[2]) <= TTL
    assert await redis.lrange(keys.inbox(a), 0, -1) == [b"cmd"]
    r = await scripts.do_claim_or_forward(b, sid, may_claim=True)
    assert r[0] == OWNED_ELSEWHERE and r[1].decode() == a
    assert await scripts.do_read_lease(sid) == (a, 1)
    await scripts.do_leave(a)
    r = await scripts.do_claim_or_forward(b, sid, may_claim=True)
    assert r[0] == CLAIMED and int(r[1]) == 2 and r[2] == b"v1" and r[3] == b"takeover"
    assert a in scripts.dead
    assert await write(scripts, a, 1, sid, b"zombie") == 0  # fenced by the lease (no liveness check)
    assert await write(scripts, b, 2, sid, b"v2") == 1
    assert await redis.get(keys.checkpoint(sid)) == b"v2"


async def test_an_owner_whose_liveness_lapsed_writes_until_its_lease_is_taken(redis: Any, key_prefix: str) -> None:
    scripts = one_slot(redis, key_prefix)
    a, b = await joined(scripts, 2)
    sid = str(uuid.uuid4())
    await scripts.do_claim_or_forward(a, sid, may_claim=True)
    await scripts.do_leave(a)
    # still the only possible writer: whoever takes over next reads this write with the takeover
    assert await write(scripts, a, 1, sid, b"late") == 1
    r = await scripts.do_claim_or_forward(b, sid, may_claim=True)
    assert r[0] == CLAIMED and r[2] == b"late" and r[3] == b"takeover"
    assert await write(scripts, a, 1, sid, b"later") == 0


async def test_the_owner_hint_forwards_in_one_call_and_a_dead_hint_is_looked_up(redis: Any, key_prefix: str) -> None:
    scripts = one_slot(redis, key_prefix)
    keys = scripts.keys
    a, b, c = await joined(scripts, 3)
    sid = str(uuid.uuid4())
    await scripts.do_claim_or_forward(a, sid, may_claim=True)
    sha = scripts._forward.sha
    calls: list[str] = []
    evalsha = redis.evalsha

    async def counted(sha_: str, *args: Any) -> Any:
        calls.append("forward" if sha_ == sha else "other")
        return await evalsha(sha_, *args)

    redis.evalsha = counted
    try:
        r = await scripts.do_claim_or_forward(b, sid, may_claim=False, payload=b"one", owner_hint=a)
        assert r[0] == FORWARDED and r[1].decode() == a and calls == ["forward"]
        # a stale hint naming a dead instance: the lease is read and its owner asked
        await scripts.do_leave(c)
        r = await scripts.do_claim_or_forward(b, sid, may_claim=False, payload=b"two", owner_hint=c)
        assert r[0] == FORWARDED and r[1].decode() == a
    finally:
        redis.evalsha = evalsha
    assert await redis.lrange(keys.inbox(a), 0, -1) == [b"one", b"two"]
    assert await redis.exists(keys.inbox(c)) == 0
    # a dead owner and may_claim=False: taken from it by nobody, reported as free
    await scripts.do_leave(a)
    assert (await scripts.do_claim_or_forward(b, sid, may_claim=False, payload=b"x"))[0] == UNOWNED
    assert (await scripts.do_claim_or_forward(b, sid, may_claim=True))[0] == CLAIMED
    assert (await scripts.do_claim_or_forward(b, sid, may_claim=False))[0] == MINE


async def test_hand_off_gives_the_lease_and_queues_the_activation(redis: Any, key_prefix: str) -> None:
    scripts = one_slot(redis, key_prefix)
    keys = scripts.keys
    a, b, c = await joined(scripts, 3)
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    await scripts.do_claim_or_forward(a, sid, may_claim=True)
    assert await scripts.do_hand_off(a, 1, sid, b, b"activate") == 1
    assert await scripts.do_read_lease(sid) == (b, 2)
    assert await redis.lrange(keys.inbox(b), 0, -1) == [b"activate"]
    assert await scripts.do_hand_off(a, 1, sid, b, b"again") == 0  # not mine any more
    # a dead target: the lease names it, and the next claim takes it over
    await scripts.do_claim_or_forward(a, other, may_claim=True)
    await scripts.do_leave(c)
    assert await scripts.do_hand_off(a, 1, other, c, b"activate") == 2
    r = await scripts.do_claim_or_forward(b, other, may_claim=True)
    assert r[0] == CLAIMED and r[3] == b"takeover"


async def test_claim_for_a_successor_forwards_the_command_to_it(redis: Any, key_prefix: str) -> None:
    scripts = one_slot(redis, key_prefix)
    a, b = await joined(scripts, 2)
    sid = str(uuid.uuid4())
    r = await scripts.do_claim_or_forward(a, sid, may_claim=True, payload=b"cmd", claim_for=b)
    assert r[0] == FORWARDED and r[1].decode() == b
    assert await scripts.do_read_lease(sid) == (b, 1)
    assert await redis.lrange(scripts.keys.inbox(b), 0, -1) == [b"cmd"]


async def test_adoption_takes_due_sessions_of_dead_or_no_owners_on_every_partition(
        redis: Any, key_prefix: str) -> None:
    scripts = one_slot(redis, key_prefix)
    keys = scripts.keys
    a, b = await joined(scripts, 2)
    sids = [str(uuid.uuid4()) for _ in range(12)]
    for sid in sids:
        await scripts.do_claim_or_forward(a, sid, may_claim=True)
        assert await write(scripts, a, 1, sid, b"cp-" + sid.encode(), deadline_ms=1000) == 1
    assert len({keys.partition(sid) for sid in sids}) > 1
    assert await scripts.do_release(a, 1, sids[0])

    async def sweep(inc: str) -> tuple[dict[str, str], list[str]]:
        found, mine = {}, []
        for p in range(PARTITIONS):
            answer = await scripts.do_adopt_orphans(inc, until_ms=2000, scan=100, batch=100, partition=p)
            assert answer is not None
            checked, fetched, claimed, own = answer
            assert checked == fetched
            found.update({sid: reason for sid, _epoch, _cp, reason in claimed})
            mine += own
        return found, mine

    found, mine = await sweep(b)
    assert found == {sids[0]: "released"} and mine == []  # a lives: its leases stay
    found, mine = await sweep(a)
    assert found == {} and sorted(mine) == sorted(sids[1:])
    await scripts.do_leave(a)
    found, mine = await sweep(b)
    assert found == dict.fromkeys(sids[1:], "takeover") and sorted(mine) == [sids[0]]
    assert {(await scripts.do_read_lease(sid))[0] for sid in sids} == {b}


async def test_membership_on_separate_slots_lists_and_prunes(redis: Any, key_prefix: str) -> None:
    scripts = one_slot(redis, key_prefix)
    keys = scripts.keys
    a, b = await joined(scripts, 2)
    assert not await scripts.do_join(a, b"{}", TTL)  # never overwrites a live incarnation
    await redis.lpush(keys.inbox_popped(b), b"x")
    assert sorted(json.loads(i)["incarnation"] for i in await scripts.do_list_instances()) == sorted([a, b])
    await scripts.do_leave(b)
    assert [json.loads(i)["incarnation"] for i in await scripts.do_list_instances()] == [a]
    assert await redis.smembers(keys.instances) == {a.encode()}
    assert await redis.exists(keys.inbox_popped(b)) == 0 and b in scripts.dead


async def test_the_partition_count_is_recorded_and_another_one_refused(redis: Any, key_prefix: str) -> None:
    await Scripts(redis, Keys(key_prefix, 4)).do_check_layout()
    await Scripts(redis, Keys(key_prefix, 4)).do_check_layout()
    with pytest.raises(ValueError, match="4 partitions"):
        await Scripts(redis, Keys(key_prefix, 16)).do_check_layout()


def test_partitions_spread_over_equal_slot_ranges_and_keys_share_their_slot() -> None:
    for k in (1, 3, 16, 64):
        tags = partition_tags(k)
        assert [key_slot(t.encode()) * k // 16384 for t in tags] == list(range(k))
    keys = Keys("kairos:", 16)
    sid = str(uuid.uuid4())
    p = keys.partition(sid)
    slots = {key_slot(k.encode()) for k in (keys.lease(sid), keys.checkpoint(sid), keys.outbox_of(p),
                                            keys.deadlines_of(p))}
    assert len(slots) == 1
    inc = uuid.uuid4().hex
    assert len({key_slot(k.encode()) for k in (keys.liveness(inc), keys.inbox(inc), keys.inbox_popped(inc))}) == 1
    with pytest.raises(ValueError):
        Keys("bad{prefix}:")
