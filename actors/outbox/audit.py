"""The audit trail: outbox entries copied into PostgreSQL exactly once, and the facade the web layer
uses for everything that lives in PostgreSQL (event history, devices, restore, readiness).

The audit worker is consumer group `audit` on the outbox stream. Each batch is written in one
transaction (COPY into a temporary table, then INSERT ... SELECT ... ON CONFLICT DO NOTHING, so a
replayed batch adds nothing) and acknowledged only after the commit. While PostgreSQL is
unreachable the worker keeps the batch in hand and retries with exponential backoff: the audit is
delayed, never lost (docs/audit.md).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from actors.connection import redis_failed
from actors.keys import AUDIT_GROUP, PUSH_GROUP, Keys
from actors.outbox import migrations
from actors.outbox.consumer import (
    Backoff,
    Entry,
    Lag,
    combined_lag,
    consume,
    consumers,
    keep_entries,
)
from actors.supervise import supervised
from kairos.errors import DeviceTokenTaken, Unavailable

if TYPE_CHECKING:
    from kairos.session import Session

log = logging.getLogger(__name__)

AUDIT_LAG = Gauge("kairos_audit_lag_seconds", "Age of the oldest outbox entry not yet in PostgreSQL")
AUDIT_PENDING = Gauge("kairos_audit_pending", "Outbox entries read by the audit but not yet acknowledged")
AUDIT_BATCHES = Counter("kairos_audit_batches_total", "Batches committed to PostgreSQL")
AUDIT_ROWS = Counter("kairos_audit_events_total", "Event rows inserted into sync_events")
AUDIT_DUPLICATES = Counter("kairos_audit_duplicates_total", "Event rows skipped as already stored")
AUDIT_RETRIES = Counter("kairos_audit_retries_total", "Batch attempts that failed and were retried")
AUDIT_DEAD_LETTERS = Counter(
    "kairos_audit_dead_letters_total", "Outbox entries PostgreSQL cannot store, kept in audit_dead_letters"
)
OUTBOX_RECLAIMED = Counter(
    "kairos_outbox_reclaimed_total", "Entries taken over from dead consumers", ["group"]
)
OUTBOX_TRIMMED = Counter("kairos_outbox_trimmed_total", "Entries trimmed after every group acked")

_CONFIG_KEYS = (
    "total_time_ms", "time_per_cycle_ms", "increment_ms", "max_time_ms", "expiry_policy",
    "time_warning_ms", "visibility",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The staging table lives per connection and empties itself at every commit. It holds the raw
# update messages: PostgreSQL extracts the columns itself (C-speed JSON parsing, no Python work
# per event, one COPY row per message).
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS audit_stage (m jsonb) ON COMMIT DELETE ROWS
"""
_MS = "(timestamptz 'epoch' + ({} * interval '1 millisecond'))"
_INSERT_EVENTS = f"""
INSERT INTO sync_events (session_id, version, seq, event_type, participant_id, group_id,
    time_remaining_ms, time_elapsed_ms, cycle_number, "timestamp", state_snapshot, metadata, command)
SELECT lower(m->>'session_id'),
       COALESCE((e->>'version')::bigint, (m->>'version')::bigint),
       (o - 1)::smallint,
       e->>'type',
       lower(e->>'participant_id'),
       lower(COALESCE(e->'data'->>'group_id', CASE WHEN m->'state'->>'sync_mode' = 'per_group' THEN
           (SELECT p->>'group_id' FROM jsonb_array_elements(m->'state'->'participants') p
            WHERE p->>'participant_id' = e->>'participant_id' LIMIT 1) END)),
       (e->'data'->>'time_remaining_ms')::bigint,
       (e->'data'->>'time_elapsed_ms')::bigint,
       (e->'data'->>'cycle_number')::integer,
       {_MS.format("COALESCE((e->>'at_ms')::bigint, (m->>'server_time_ms')::bigint)")},
       NULLIF(m->'state', 'null'::jsonb),
       COALESCE(e->'data', '{{}}'::jsonb),
       CASE WHEN o = 1 AND m ? 'command_id' THEN jsonb_build_object(
           'command_id', m->'command_id', 'expired_participant_id', m->'expired_participant_id',
           'server_time_ms', m->'server_time_ms') END
FROM audit_stage, jsonb_array_elements(m->'events') WITH ORDINALITY AS x(e, o)
ORDER BY 1, 2, 3
ON CONFLICT (session_id, version, event_type) DO NOTHING
"""
_CONFIG = "jsonb_strip_nulls(jsonb_build_object({}))".format(
    ", ".join(f"'{k}', st->'{k}'" for k in _CONFIG_KEYS)
)
# A summary only moves forward: an older message (a reclaimed entry processed late) changes
# nothing; a deletion (state null) records only the deletion.
_KEEP = ("sync_mode", "owner", "config", "time_per_cycle_ms", "increment_ms", "max_time_ms",
         "status", "final_status", "created_at", "started_at", "completed_at", "deleted_at",
         "metadata")
_UPSERT_SESSIONS = f"""
INSERT INTO sync_sessions AS s (session_id, sync_mode, owner, config, time_per_cycle_ms,
    increment_ms, max_time_ms, status, final_status, created_at, started_at, completed_at,
    deleted_at, total_cycles, total_participants, last_version, metadata)
SELECT lower(m->>'session_id'),
       st->>'sync_mode',
       st->>'owner',
       CASE WHEN st IS NULL THEN NULL ELSE {_CONFIG} END,
       (st->>'time_per_cycle_ms')::bigint,
       (st->>'increment_ms')::bigint,
       (st->>'max_time_ms')::bigint,
       CASE WHEN st IS NULL THEN 'deleted' ELSE st->>'status' END,
       CASE WHEN st->>'status' IN ('expired', 'completed', 'cancelled') THEN st->>'status' END,
       (st->>'created_at')::timestamptz,
       (st->>'session_started_at')::timestamptz,
       (st->>'session_completed_at')::timestamptz,
       CASE WHEN st IS NULL THEN {_MS.format("(m->>'server_time_ms')::bigint")} END,
       COALESCE((SELECT sum((p->>'cycle_count')::integer) FROM jsonb_array_elements(st->'participants') p), 0),
       COALESCE(jsonb_array_length(st->'participants'), 0),
       (m->>'version')::bigint,
       NULLIF(st->'metadata', 'null'::jsonb)
FROM (SELECT DISTINCT ON (lower(m->>'session_id')) m FROM audit_stage
      ORDER BY lower(m->>'session_id'), (m->>'version')::bigint DESC) latest,
     LATERAL (SELECT NULLIF(m->'state', 'null'::jsonb) AS st) x
ON CONFLICT (session_id) DO UPDATE SET
    {", ".join(f"{c} = COALESCE(EXCLUDED.{c}, s.{c})" for c in _KEEP)},
    total_cycles = CASE WHEN EXCLUDED.sync_mode IS NULL THEN s.total_cycles ELSE EXCLUDED.total_cycles END,
    total_participants = CASE WHEN EXCLUDED.sync_mode IS NULL THEN s.total_participants
                              ELSE EXCLUDED.total_participants END,
    last_version = EXCLUDED.last_version,
    updated_at = now()
WHERE s.last_version < EXCLUDED.last_version
"""
_SELECT_EVENTS = """
SELECT version, seq, event_type, participant_id, group_id, time_remaining_ms, time_elapsed_ms,
       cycle_number, "timestamp", state_snapshot, metadata
FROM sync_events WHERE session_id = $1 AND version > $2
ORDER BY version, seq LIMIT $3
"""
_SELECT_VERSION = """
SELECT version, seq, event_type, participant_id, group_id, time_remaining_ms, time_elapsed_ms,
       cycle_number, "timestamp", state_snapshot, metadata
FROM sync_events WHERE session_id = $1 AND version = $2 ORDER BY seq
"""
_INSERT_DEAD_LETTER = """
INSERT INTO audit_dead_letters (stream_id, session_id, raw, error) VALUES ($1, $2, $3, $4)
ON CONFLICT (stream_id) DO NOTHING
"""
_SELECT_LAST_SNAPSHOT = """
SELECT state_snapshot FROM sync_events WHERE session_id = $1
ORDER BY version DESC, seq DESC LIMIT 1
"""
# The idempotency window of a restored session: the command ids of its last changes.
_SELECT_COMMANDS = """
SELECT version, command FROM sync_events WHERE session_id = $1 AND command IS NOT NULL
ORDER BY version DESC LIMIT $2
"""


def _transient(error: BaseException) -> bool:
    """True when retrying later can succeed (PostgreSQL down, restarting, overloaded)."""
    if isinstance(error, asyncpg.PostgresError):
        # 22 data exception, 23 integrity violation: the rows themselves are bad; all else
        # (08 connection, 53 resources, 57 shutdown/restart, 42P01 table missing...) is retried.
        return (getattr(error, "sqlstate", None) or "")[:2] not in ("22", "23")
    return True


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Create the per-connection staging table used by `write_batch`."""
    await conn.execute(_STAGING)
    # The staging table has no statistics, so the planner guesses huge costs and JIT-compiles
    # every batch's statements (~0.6 s each): far more than running them.
    await conn.execute("SET jit = off")


async def write_batch(conn: asyncpg.Connection, entries: list[Entry]) -> tuple[int, int]:
    """Store a batch in one transaction; returns (event rows inserted, rows already present)."""
    records = [(e.raw,) for e in entries if e.raw is not None]
    async with conn.transaction():
        await conn.copy_records_to_table("audit_stage", records=records, columns=("m",))
        status = await conn.execute(_INSERT_EVENTS)
        await conn.execute(_UPSERT_SESSIONS)
        total = await conn.fetchval(
            "SELECT COALESCE(sum(jsonb_array_length(m->'events')), 0) FROM audit_stage"
        )
    inserted = int(status.rsplit(" ", 1)[-1])
    return inserted, int(total) - inserted


class AuditWorker:
    """Consumer `consumer` of group `audit`: outbox -> sync_events/sync_sessions (see module doc)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        database_url: str,
        consumer: str,
        *,
        migrate: bool = True,
        batch_size: int = 1000,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        housekeeping_s: float = 1.0,
        backoff_cap_s: float = 2.0,
        consumer_gc_ms: int = 3_600_000,
        abandoned_push_ms: int = 600_000,
    ) -> None:
        self.consumer_gc_ms = consumer_gc_ms
        self.abandoned_push_ms = abandoned_push_ms
        self._next_gc = 0.0
        # One consumer per outbox partition, read concurrently; `outbox` is partition 0's.
        self.outboxes = consumers(redis, keys, AUDIT_GROUP, consumer, start_id="0", batch_size=batch_size,
                                  block_ms=block_ms, claim_idle_ms=claim_idle_ms, parse=False)
        self.outbox = self.outboxes[0]
        self.database_url = database_url
        self.migrate = migrate
        self.housekeeping_s = housekeeping_s
        self.backoff_cap_s = backoff_cap_s
        self._conn: asyncpg.Connection | None = None
        self._next_housekeeping = 0.0
        self._reported_reclaimed = 0
        self.stored = 0  # rows inserted by this worker (bench and tests read it)
        self.retries = 0  # failed batch attempts retried (PostgreSQL unreachable)
        self.dead_letters = 0  # entries moved to audit_dead_letters by this worker

    async def run(self) -> None:
        """Consume forever (until cancelled); never raises on Redis or PostgreSQL outages.

        The next batch is read from Redis while the current one is written to PostgreSQL (one
        reader per outbox partition).
        """
        try:
            await consume(self.outboxes, self.backoff_cap_s, self._store, self._housekeeping, read_ahead=1)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_connection()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self.database_url, timeout=5, command_timeout=30)
            try:
                if self.migrate:
                    await migrations.migrate_connection(conn)
                await prepare_connection(conn)
            except BaseException:
                await conn.close(timeout=1)
                raise
            self._conn = conn
        return self._conn

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=1)
            except Exception:  # a dead connection: nothing left to close politely
                conn.terminate()

    async def _store(self, batch: list[Entry]) -> None:
        """Write the batch, retrying while PostgreSQL is unreachable; entries it can never store
        go to the dead-letter table (they must not block the ones behind, nor vanish)."""
        readable = []
        for entry in batch:
            if entry.raw is None:
                await self._bury(entry, "not an update message (unreadable or not UTF-8)")
            else:
                readable.append(entry)
        backoff = Backoff(cap_s=self.backoff_cap_s)
        while readable:
            try:
                conn = await self._connection()
                inserted, duplicates = await write_batch(conn, readable)
            except Exception as e:
                if not _transient(e):
                    log.warning("audit: batch rejected by PostgreSQL (%r); storing one by one", e)
                    await self._store_one_by_one(readable)
                    return
                await self._retry_later(readable, backoff, e)
                continue
            AUDIT_BATCHES.inc()
            AUDIT_ROWS.inc(inserted)
            AUDIT_DUPLICATES.inc(duplicates)
            self.stored += inserted
            if backoff.attempt:
                log.info("audit: PostgreSQL back after %d retries", backoff.attempt)
            return

    async def _retry_later(self, entries: list[Entry], backoff: Backoff, error: Exception) -> None:
        """PostgreSQL is unreachable: keep our claim on `entries` and wait before the next try."""
        AUDIT_RETRIES.inc()
        self.retries += 1
        if backoff.attempt == 0:
            log.warning("audit: PostgreSQL unavailable, retrying with backoff: %r", error)
        await self._close_connection()
        await keep_entries(self.outboxes, entries)
        await self._housekeeping()  # keeps the lag gauges moving while we wait
        await backoff.wait()

    async def _store_one_by_one(self, entries: list[Entry]) -> None:
        for entry in entries:
            try:
                conn = await self._connection()
                inserted, duplicates = await write_batch(conn, [entry])
            except Exception as e:
                if _transient(e):
                    # PostgreSQL went away meanwhile: back to the batch path (retries forever).
                    await self._close_connection()
                    await self._store([entry])
                else:
                    await self._bury(entry, repr(e))
                continue
            AUDIT_ROWS.inc(inserted)
            AUDIT_DUPLICATES.inc(duplicates)
            self.stored += inserted

    async def _bury(self, entry: Entry, error: str) -> None:
        """Keep an entry PostgreSQL cannot store in `audit_dead_letters` (raw bytes and error),
        retrying while PostgreSQL is unreachable; the entry is acknowledged after that."""
        backoff = Backoff(cap_s=self.backoff_cap_s)
        error = error.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")
        while True:
            try:
                conn = await self._connection()
                await conn.execute(_INSERT_DEAD_LETTER, entry.name, _session_of(entry), entry.blob, error)
            except Exception as e:
                if _transient(e):
                    await self._retry_later([entry], backoff, e)
                    continue
                log.error("audit: outbox entry %s cannot even be dead-lettered (%r); dropped", entry.id, e)
                return
            AUDIT_DEAD_LETTERS.inc()
            self.dead_letters += 1
            log.error("audit: outbox entry %s cannot be stored (%s); kept in audit_dead_letters",
                      entry.id, error)
            return

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.housekeeping_s
        try:
            for outbox in self.outboxes:
                OUTBOX_TRIMMED.inc(await outbox.trim(lossy={PUSH_GROUP: self.abandoned_push_ms}))
            lag = await combined_lag(self.outboxes)
            if now >= self._next_gc:
                self._next_gc = now + max(1.0, self.consumer_gc_ms / 10_000)
                for outbox in self.outboxes:
                    for name in await outbox.forget_idle_consumers(self.consumer_gc_ms):
                        log.info("audit: removed idle consumer %s (no pending entries)", name)
        except Exception as e:
            if not redis_failed(e):
                raise
            log.warning("audit: housekeeping failed: %s", e)
            return
        AUDIT_PENDING.set(lag.pending)
        AUDIT_LAG.set(lag.oldest_age_ms / 1000)
        reclaimed = sum(outbox.reclaimed for outbox in self.outboxes)
        fresh = reclaimed - self._reported_reclaimed
        if fresh:
            OUTBOX_RECLAIMED.labels(AUDIT_GROUP).inc(fresh)
            self._reported_reclaimed = reclaimed

    async def lag(self) -> Lag:
        """The audit group's current lag (over every partition)."""
        return await combined_lag(self.outboxes)


class AuditServices:
    """Everything PostgreSQL-backed, as one `async with` lifetime: the audit worker and (when
    `fcm_credentials` is set) the push worker run in its task group; the methods serve the API."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        database_url: str,
        consumer: str,
        partitions: int = 1,
        fcm_credentials: str | None = None,
        fcm_endpoint: str | None = None,
        migrate: bool = True,
        batch_size: int = 1000,
        claim_idle_ms: int = 30_000,
        push_claim_idle_ms: int = 30_000,
        backoff_cap_s: float = 2.0,
    ) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix, partitions)
        self.database_url = database_url
        self.consumer = consumer
        self.fcm_credentials = fcm_credentials
        self.fcm_endpoint = fcm_endpoint
        self.migrate = migrate
        self.worker = AuditWorker(
            redis, self.keys, database_url, consumer, migrate=migrate, batch_size=batch_size,
            claim_idle_ms=claim_idle_ms, backoff_cap_s=backoff_cap_s,
        )
        self.push_claim_idle_ms = push_claim_idle_ms
        self.push: Any = None  # actors.outbox.push.PushWorker when push is on
        self._pool: asyncpg.Pool | None = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> AuditServices:
        from actors.outbox.push import Devices, PushWorker

        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            # min_size=0: the service starts (and serves Redis-only routes) while PostgreSQL is down.
            self._pool = await asyncpg.create_pool(
                self.database_url, min_size=0, max_size=4, timeout=5, command_timeout=10
            )
            stack.push_async_callback(self._pool.close)
            if self.migrate:
                try:
                    applied = await migrations.migrate(self.database_url)
                    if applied:
                        log.info("audit: applied migrations %s", applied)
                except Exception as e:
                    if not _transient(e):
                        raise
                    log.warning("audit: PostgreSQL unreachable at start (%r); the worker migrates later", e)
            self.devices = Devices(self._pool)
            if self.fcm_credentials:
                self.push = PushWorker(
                    self.redis, self.keys, self.devices, self.consumer,
                    credentials=self.fcm_credentials, endpoint=self.fcm_endpoint,
                    claim_idle_ms=self.push_claim_idle_ms,
                )
                await stack.enter_async_context(self.push)
            else:
                log.info("push notifications off (KAIROS_FCM_CREDENTIALS unset)")
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # runs first on exit: stop the workers
            tg.start_soon(supervised, self.worker.run, "audit worker")
            if self.push is not None:
                tg.start_soon(supervised, self.push.run, "push worker")
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # Not handing `exc` on: the body's own exception then propagates as itself instead of
            # being wrapped into the task group's ExceptionGroup.
            await stack.aclose()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("AuditServices used outside its `async with`")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return await self._require_pool().fetch(sql, *args)
        except Exception as e:
            if _transient(e) and not isinstance(e, RuntimeError):
                raise Unavailable("Audit database unavailable", retry_after=2) from e
            raise

    async def events(self, session_id: str, after_version: int | None, limit: int = 500) -> list[dict]:
        """The session's audited events, oldest first, with version > `after_version`.

        A page never splits one version's events (so `after_version` = the last version seen is
        a correct cursor); it may exceed `limit` only when a single version has more events.
        Each item: `session_id`, `version`, `type`, `timestamp` (ISO), `at_ms`, `participant_id`
        (nullable), `data` (the event's data), `state` (the session after the change, null when
        deleted) and, when known, `group_id`, `time_remaining_ms`, `time_elapsed_ms`,
        `cycle_number`.
        """
        sid = session_id.lower()
        after = -1 if after_version is None else int(after_version)
        limit = max(1, int(limit))
        rows = await self._fetch(_SELECT_EVENTS, sid, after, limit + 1)
        if len(rows) > limit:
            cut = rows[limit - 1]["version"]
            if rows[limit]["version"] == cut:
                kept = [r for r in rows[:limit] if r["version"] != cut]
                rows = kept or await self._fetch(_SELECT_VERSION, sid, cut)
            else:
                rows = rows[:limit]
        return [_event_json(sid, r) for r in rows]

    async def register_device(self, sub: str, token: str, platform: str, *, take_over: bool = False) -> None:
        """Register a push token for `sub`; raises DeviceTokenTaken when another `sub` holds it
        (unless `take_over`: an admin reassigning it)."""
        try:
            mine = await self.devices.register(sub, token, platform, take_over=take_over)
        except Exception as e:
            raise _unavailable_or(e) from e
        if not mine:
            raise DeviceTokenTaken("This push token is registered by another caller")

    async def delete_device(self, sub: str | None, token: str) -> None:
        """Forget `sub`'s push token, or anyone's when `sub` is None (no-op when unknown or
        someone else's)."""
        try:
            await self.devices.delete(sub, token)
        except Exception as e:
            raise _unavailable_or(e) from e

    async def restore(self, session_id: str) -> Session | None:
        """The last audited snapshot of the session (None if never audited or deleted), with its
        idempotency window and `metadata.restored_from_audit = True` so clients can tell."""
        from kairos.rules import IDEMPOTENCY_MAX
        from kairos.wire import remembered, session_from_json

        rows = await self._fetch(_SELECT_LAST_SNAPSHOT, session_id.lower())
        if not rows or rows[0]["state_snapshot"] is None:
            return None
        commands = await self._fetch(_SELECT_COMMANDS, session_id.lower(), IDEMPOTENCY_MAX)
        window = remembered([(r["version"], json.loads(r["command"])) for r in commands])
        state = session_from_json(json.loads(rows[0]["state_snapshot"]), window)
        state.metadata = {**(state.metadata or {}), "restored_from_audit": True}
        return state

    async def ping(self) -> None:
        """Raise `Unavailable` unless PostgreSQL answers."""
        await self._fetch("SELECT 1")

    async def lag(self) -> Lag:
        """The audit group's lag (pending count, oldest unacknowledged entry and its age)."""
        return await self.worker.lag()


def _session_of(entry: Entry) -> str | None:
    """The session id a dead entry names, when it can be read (for finding it later)."""
    try:
        sid = json.loads(entry.blob or b"").get("session_id")
    except (ValueError, AttributeError):
        return None
    return sid.lower() if isinstance(sid, str) and sid.isprintable() else None


def _unavailable_or(error: Exception) -> Exception:
    if _transient(error):
        return Unavailable("Audit database unavailable", retry_after=2)
    return error


def _event_json(session_id: str, row: asyncpg.Record) -> dict[str, Any]:
    from kairos.wire import iso_ms

    at_ms = (row["timestamp"] - _EPOCH) // timedelta(milliseconds=1)
    out: dict[str, Any] = {
        "session_id": session_id,
        "version": row["version"],
        "type": row["event_type"],
        "timestamp": iso_ms(at_ms),
        "at_ms": at_ms,
        "participant_id": row["participant_id"],
    }
    for key in ("group_id", "time_remaining_ms", "time_elapsed_ms", "cycle_number"):
        if row[key] is not None:
            out[key] = row[key]
    out["data"] = json.loads(row["metadata"]) if row["metadata"] is not None else {}
    out["state"] = json.loads(row["state_snapshot"]) if row["state_snapshot"] is not None else None
    return out
