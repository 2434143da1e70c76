"""Trimming the outbox: only what every group acknowledged, except a push group nobody reads."""

from __future__ import annotations

import pytest

from actors.keys import AUDIT_GROUP, PUSH_GROUP
from actors.outbox.consumer import OutboxConsumer
from tests.audit.audit_messages import Lifecycle
from tests.audit.conftest import append, eventually

pytestmark = pytest.mark.anyio


async def test_trim_waits_for_every_group_but_not_for_an_abandoned_push_group(redis, keys) -> None:
    ids = await append(redis, keys, Lifecycle().full()[:5])
    audit = OutboxConsumer(redis, keys, AUDIT_GROUP, "a1", start_id="0")
    push = OutboxConsumer(redis, keys, PUSH_GROUP, "p1", start_id="0", batch_size=2)
    await audit.ensure_group()
    await push.ensure_group()

    await audit.ack([e.id for e in await audit.next_batch()])
    in_hand = await push.next_batch()  # two entries delivered to push, not acknowledged
    assert [e.id for e in in_hand] == ids[:2]
    assert await audit.trim() == 0  # push still needs everything from the first entry on
    assert (await push.lag()).oldest_id == ids[0]

    await push.ack([e.id for e in in_hand])
    assert await audit.trim() == 2  # both groups are past the first two
    assert [i.decode() for i, _ in await redis.xrange(keys.outbox)] == ids[2:]

    # Nobody in push has read for a while (push switched off everywhere): not waited for.
    assert await audit.trim(lossy={PUSH_GROUP: 0}) == 3
    assert await redis.xlen(keys.outbox) == 0
    assert (await audit.lag()).oldest_id is None


async def _idle_ms(redis, keys) -> int:
    rows = await redis.xpending_range(keys.outbox, AUDIT_GROUP, min="-", max="+", count=10)
    return min(r["time_since_delivered"] for r in rows)


async def test_keeping_a_batch_resets_its_idle_time_and_idle_batches_are_reclaimed(redis, keys) -> None:
    await append(redis, keys, Lifecycle().full()[:3])
    slow = OutboxConsumer(redis, keys, AUDIT_GROUP, "slow")
    await slow.ensure_group()
    batch = await slow.next_batch()
    assert len(batch) == 3
    await eventually(lambda: _at_least(_idle_ms(redis, keys), 200), what="entries idle 200 ms")
    await slow.keep([e.id for e in batch])  # still working on it (PostgreSQL down, say)
    assert await _idle_ms(redis, keys) < 200
    patient = OutboxConsumer(redis, keys, AUDIT_GROUP, "other", claim_idle_ms=60_000, block_ms=10)
    assert await patient.next_batch() == []  # not idle long enough: nothing to take
    eager = OutboxConsumer(redis, keys, AUDIT_GROUP, "other", claim_idle_ms=0, block_ms=10)
    assert [e.id for e in await eager.next_batch()] == [e.id for e in batch]
    assert eager.reclaimed == 3


async def _at_least(value, n: int) -> bool:
    return await value >= n
