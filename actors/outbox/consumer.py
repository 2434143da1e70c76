"""One consumer of one consumer group on an outbox stream, shared by the audit and push workers.

The outbox is one stream per partition (`Keys.outbox_of`, one on a single Redis by default): a
worker runs one `OutboxConsumer` per partition (`consumers()`), reads them concurrently and reports
their lag together (`combined_lag`).

At-least-once delivery: an entry is acknowledged only after its work is done; entries left pending
by a dead consumer are reclaimed with XAUTOCLAIM once idle for `claim_idle_ms`; a live consumer
that is still retrying a batch refreshes its claim so nobody steals it. Trimming removes only the
entries that every group on the stream has acknowledged.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from actors.connection import redis_failed
from actors.keys import Keys

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    """One outbox entry: its stream id and the decoded update message (None when unreadable)."""

    id: str
    message: dict[str, Any] | None
    raw: str | None = None  # the message's JSON text (None when unreadable)
    blob: bytes | None = None  # the `m` field byte for byte (None when absent), for dead letters
    partition: int = 0  # whose outbox stream it came from

    @property
    def name(self) -> str:
        """Unique over all partitions: the stream id, after `partition/` past partition 0."""
        return f"{self.partition}/{self.id}" if self.partition else self.id


@dataclass(slots=True)
class Lag:
    """How far a group is behind: entries delivered but not yet acknowledged, and the oldest
    entry the group has not acknowledged (delivered or not) with its age; None when caught up."""

    pending: int
    oldest_id: str | None
    oldest_age_ms: int


class Backoff:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... capped; `reset()` after a success."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt (grows until the cap)."""
        delay = min(self.cap_s, self.first_s * (2**self.attempt))
        self.attempt += 1
        return delay * random.uniform(0.8, 1.0)

    async def wait(self) -> None:
        """Sleep for the next delay."""
        await anyio.sleep(self.next_delay())

    def reset(self) -> None:
        self.attempt = 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _after(entry_id: str) -> str:
    """The smallest stream id greater than `entry_id`."""
    ms, seq = entry_id.split("-", 1)
    return f"{ms}-{int(seq) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-", 1)
    return int(ms), int(seq)


def decode_entry(entry_id: Any, fields: dict | None, parse: bool = True) -> Entry:
    """Decode a raw stream entry (field `m` = update message JSON); garbage decodes to None.
    With `parse=False` only the text is kept (the audit lets PostgreSQL parse it)."""
    eid = _s(entry_id)
    if not fields:
        return Entry(eid, None)
    raw = fields.get(b"m", fields.get("m"))
    blob = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        if not parse:
            return Entry(eid, None, text, blob)
        message = json.loads(text) if text is not None else None
    except (ValueError, TypeError):
        return Entry(eid, None, None, blob)
    if not isinstance(message, dict):
        return Entry(eid, None, None, blob)
    return Entry(eid, message, text, blob)


class OutboxConsumer:
    """Consumer `consumer` of group `group` on the outbox stream (see module docstring).

    `start_id` is where a newly created group starts: "0" (everything still in the stream, for
    the audit) or "$" (only what arrives from now on, for push: stale notifications are useless).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        group: str,
        consumer: str,
        *,
        start_id: str = "0",
        batch_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        parse: bool = True,
        partition: int = 0,
    ) -> None:
        self.redis = redis
        self.parse = parse
        self.partition = partition
        self.stream = keys.outbox_of(partition)
        self.group = group
        self.consumer = consumer
        self.start_id = start_id
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self._own_pending_done = False  # our own pending entries (same name, earlier run) re-read
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0
        self.reclaimed = 0  # entries taken over from other consumers (for metrics and tests)

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; an existing group is left as it is."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def next_batch(self) -> list[Entry]:
        """The next entries to work on: reclaimed idle ones first, then our own pending ones
        (after a restart under the same name), then new ones (blocking up to `block_ms`)."""
        try:
            return await self._next_batch()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # The stream (or group) was deleted under us: recreate and carry on.
            await self.ensure_group()
            return []

    async def _next_batch(self) -> list[Entry]:
        now = time.monotonic()
        if now >= self._next_claim_at:
            self._next_claim_at = now + max(0.2, self.claim_idle_ms / 2000)
            claimed = await self._autoclaim()
            if claimed:
                return claimed
        if not self._own_pending_done:
            entries = await self._read("0", block=None)
            if entries:
                return entries
            self._own_pending_done = True
        return await self._read(">", block=self.block_ms)

    async def _read(self, from_id: str, block: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: from_id}, count=self.batch_size, block=block
        )
        out: list[Entry] = []
        for _stream, items in reply or []:
            out.extend(self._entry(eid, fields) for eid, fields in items)
        return out

    def _entry(self, entry_id: Any, fields: dict | None) -> Entry:
        entry = decode_entry(entry_id, fields, self.parse)
        entry.partition = self.partition
        return entry

    async def _autoclaim(self) -> list[Entry]:
        reply = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.batch_size,
        )
        cursor, items = _s(reply[0]), reply[1]
        self._claim_cursor = cursor
        entries = [self._entry(eid, fields) for eid, fields in items]
        if entries:
            self.reclaimed += len(entries)
            log.info("outbox %s: reclaimed %d idle entries", self.group, len(entries))
        return entries

    async def batches(self, backoff_cap_s: float = 2.0) -> AsyncIterator[list[Entry]]:
        """`next_batch()` forever (empty lists when idle), creating the group first; Redis
        errors are logged and retried with backoff, never raised."""
        backoff = Backoff(cap_s=backoff_cap_s)
        while True:
            try:
                await self.ensure_group()
                break
            except Exception as e:
                if not redis_failed(e):
                    raise
                log.warning("outbox %s: cannot create the consumer group yet: %s", self.group, e)
                await backoff.wait()
        backoff.reset()
        while True:
            try:
                batch = await self.next_batch()
            except Exception as e:
                if not redis_failed(e):
                    raise
                log.warning("outbox %s: read failed: %s", self.group, e)
                await backoff.wait()
                continue
            backoff.reset()
            yield batch

    async def ack(self, ids: list[str], attempts: int = 8) -> None:
        """Acknowledge finished entries, retrying Redis errors a few times; an entry left
        unacknowledged is only handled again (idempotently), so this never raises."""
        backoff = Backoff()
        while ids:
            try:
                await self.redis.xack(self.stream, self.group, *ids)
                return
            except Exception as e:
                if not redis_failed(e):
                    raise
                log.warning("outbox %s: ack failed: %s", self.group, e)
                if backoff.attempt >= attempts:
                    return
                await backoff.wait()

    async def keep(self, ids: list[str]) -> None:
        """Reset the idle time of entries still in hand (a batch being retried), so other
        consumers' XAUTOCLAIM does not take them from a consumer that is alive. Best effort."""
        if not ids:
            return
        try:
            await self.redis.xclaim(
                self.stream, self.group, self.consumer, min_idle_time=0, message_ids=ids, justid=True
            )
        except Exception as e:
            if not redis_failed(e):
                raise
            log.warning("outbox %s: could not refresh the claim on entries in hand: %s", self.group, e)

    async def _group_floor(self, info: dict) -> str:
        """The smallest id this group has not acknowledged (everything below is done)."""
        name = _s(info["name"])
        floor = _after(_s(info["last-delivered-id"]))
        if int(info.get("pending", 0)):
            summary = await self.redis.xpending(self.stream, name)
            if summary and summary.get("min"):
                floor = min(floor, _s(summary["min"]), key=_id_key)
        return floor

    async def forget_idle_consumers(self, min_idle_ms: int) -> list[str]:
        """Remove consumers (earlier incarnations) that hold nothing and have not read for
        `min_idle_ms`, so the group's consumer list does not grow with every restart."""
        gone: list[str] = []
        try:
            consumers = await self.redis.xinfo_consumers(self.stream, self.group)
        except ResponseError:
            return gone
        for c in consumers:
            name = _s(c["name"])
            if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) >= min_idle_ms:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)
                gone.append(name)
        return gone

    async def _groups(self) -> list[dict]:
        try:
            return list(await self.redis.xinfo_groups(self.stream))
        except ResponseError:  # no stream yet
            return []

    async def _abandoned(self, group: str, idle_ms: int) -> bool:
        """True when no consumer of `group` has read for `idle_ms` (or it has none)."""
        try:
            consumers = await self.redis.xinfo_consumers(self.stream, group)
        except ResponseError:
            return False
        return all(int(c["idle"]) >= idle_ms for c in consumers)

    async def trim(self, lossy: dict[str, int] | None = None) -> int:
        """Trim the entries every group has acknowledged; returns how many were removed.

        `lossy` maps groups that may miss entries (push) to an idle time: such a group is not
        waited for once none of its consumers has read for that long (push switched off on
        every instance), or the stream would grow until Redis refuses writes.
        """
        floors = []
        for g in await self._groups():
            name = _s(g["name"])
            if lossy and name in lossy and await self._abandoned(name, lossy[name]):
                continue
            floors.append(await self._group_floor(g))
        if not floors:
            return 0
        return int(await self.redis.xtrim(self.stream, minid=min(floors, key=_id_key), approximate=False))

    async def lag(self) -> Lag:
        """This group's lag (see `Lag`)."""
        groups = {_s(g["name"]): g for g in await self._groups()}
        info = groups.get(self.group)
        pending = 0 if info is None else int(info.get("pending", 0))
        floor = "-" if info is None else await self._group_floor(info)  # no group yet: all unread
        oldest = await self.redis.xrange(self.stream, min=floor, max="+", count=1)
        if not oldest:
            return Lag(pending, None, 0)
        oldest_id = _s(oldest[0][0])
        return Lag(pending, oldest_id, max(0, int(time.time() * 1000) - _id_ms(oldest_id)))


def consumers(redis: aioredis.Redis, keys: Keys, group: str, consumer: str, **options: Any) -> list[OutboxConsumer]:
    """One consumer of `group` per outbox partition."""
    return [OutboxConsumer(redis, keys, group, consumer, partition=p, **options) for p in range(keys.partitions)]


async def combined_lag(outboxes: list[OutboxConsumer]) -> Lag:
    """The lag of one group over every partition: pending entries added up, the oldest entry
    not yet acknowledged in any of them."""
    lags = [await o.lag() for o in outboxes]
    pending = sum(lag.pending for lag in lags)
    oldest = max((lag for lag in lags if lag.oldest_id is not None), key=lambda lag: lag.oldest_age_ms, default=None)
    if oldest is None:
        return Lag(pending, None, 0)
    return Lag(pending, oldest.oldest_id, oldest.oldest_age_ms)


async def keep_entries(outboxes: list[OutboxConsumer], entries: list[Entry]) -> None:
    """`keep` entries in hand, each on its own partition's stream."""
    for o in outboxes:
        ids = [e.id for e in entries if e.partition == o.partition]
        if ids:
            await o.keep(ids)


async def consume(outboxes: list[OutboxConsumer], backoff_cap_s: float,
                  handle: Callable[[list[Entry]], Awaitable[None]], housekeeping: Callable[[], Awaitable[None]],
                  *, read_ahead: int) -> None:
    """Forever (until cancelled): one reader task per outbox partition, and here, one batch at a
    time, `handle(batch)`, its ack, then `housekeeping()`. Up to `read_ahead` batches are read
    while one is handled."""

    async def read(outbox: OutboxConsumer, out: anyio.abc.ObjectSendStream[tuple[OutboxConsumer, list[Entry]]]) -> None:
        async with out:
            async for batch in outbox.batches(backoff_cap_s):
                await out.send((outbox, batch))

    send, receive = anyio.create_memory_object_stream[tuple[OutboxConsumer, list[Entry]]](read_ahead)
    async with anyio.create_task_group() as tg:
        with send:  # each reader holds a clone: the receiving end ends when every reader has
            for outbox in outboxes:
                tg.start_soon(read, outbox, send.clone())
        async with receive:
            async for outbox, batch in receive:
                if batch:
                    await handle(batch)
                    await outbox.ack([e.id for e in batch])
                await housekeeping()
