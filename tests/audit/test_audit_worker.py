"""The audit worker copies every outbox entry into PostgreSQL exactly once, in order."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from actors.keys import AUDIT_GROUP, Keys
from actors.outbox.audit import AuditServices
from actors.outbox.migrations import applied, available, migrate
from kairos.errors import DeviceTokenTaken, Unavailable
from tests.audit.audit_messages import LIFECYCLE_TYPES, Lifecycle
from tests.audit.conftest import append, eventually, fetch

pytestmark = pytest.mark.anyio


def services(redis, key_prefix: str, database_url: str, **kw) -> AuditServices:
    return AuditServices(redis, key_prefix=key_prefix, database_url=database_url,
                         consumer=f"c-{uuid.uuid4().hex[:6]}", **kw)


async def drained(audit: AuditServices) -> bool:
    lag = await audit.lag()
    return lag.pending == 0 and lag.oldest_id is None


async def test_migrate_applies_each_version_once(pg_server_url: str) -> None:
    from tests.conftest import _with_database

    name = f"kairos_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = _with_database(pg_server_url, name)
        versions = [v for v, _ in available()]
        assert versions and versions == sorted(versions)
        assert await migrate(url) == versions
        assert await migrate(url) == []
        assert await applied(url) == versions
        tables = {r["tablename"] for r in await fetch(url, "SELECT tablename FROM pg_tables")}
        assert {"sync_sessions", "sync_events", "devices", "schema_migrations", "audit_dead_letters"} <= tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_lifecycle_is_stored_in_order_exactly_once_even_when_replayed(
    redis, keys, key_prefix: str, database_url: str
) -> None:
    life = Lifecycle()
    await append(redis, keys, life.full())
    async with services(redis, key_prefix, database_url, claim_idle_ms=60_000) as audit:
        await eventually(lambda: drained(audit), what="audit caught up")
        events = await audit.events(life.session_id, None)
        assert [e["type"] for e in events] == LIFECYCLE_TYPES
        assert [e["version"] for e in events] == list(range(1, 9))
        switch = events[2]
        assert switch["participant_id"] == life.players[1]
        assert switch["time_elapsed_ms"] == 1_500 and switch["cycle_number"] == 1
        assert switch["data"]["previous_participant_id"] == life.players[0]
        assert switch["timestamp"].endswith("Z") and switch["state"]["version"] == 3
        # Every group acknowledged everything: the stream is trimmed.
        await eventually(lambda: _xlen_is(redis, keys.outbox, 0), what="outbox trimmed")

        # Replay: the whole stream again (new copies) and the group rewound. Nothing doubles.
        await append(redis, keys, list(life.sent))
        await redis.xgroup_setid(keys.outbox, AUDIT_GROUP, "0")
        await eventually(lambda: drained(audit), what="replay absorbed")
        again = await audit.events(life.session_id, None)
        assert again == events
        assert len(await audit.events(life.session_id, 7)) == 1

    summary = (await fetch(database_url, "SELECT * FROM sync_sessions WHERE session_id = $1",
                           life.session_id))[0]
    assert summary["final_status"] == "completed" and summary["status"] == "completed"
    assert summary["total_cycles"] == 3 and summary["total_participants"] == 2
    assert summary["owner"] == "owner-1" and summary["last_version"] == 8
    assert summary["started_at"] is not None and summary["completed_at"] is not None


async def _xlen_is(redis, key: str, n: int) -> bool:
    return await redis.xlen(key) == n


async def test_paging_never_splits_a_version(redis, keys, key_prefix: str, database_url: str) -> None:
    life = Lifecycle()
    msgs = [life.create(), life.start(), life.switch(warn=True), life.switch()]  # v3 has 2 events
    await append(redis, keys, msgs)
    async with services(redis, key_prefix, database_url) as audit:
        await eventually(lambda: drained(audit), what="audit caught up")
        page = await audit.events(life.session_id, None, limit=3)  # would cut v3 in half
        assert [(e["version"], e["type"]) for e in page] == [(1, "session_created"), (2, "session_started")]
        rest = await audit.events(life.session_id.upper(), page[-1]["version"], limit=3)
        assert [(e["version"], e["type"]) for e in rest] == [
            (3, "cycle_switched"), (3, "time_warning"), (4, "cycle_switched")]


async def test_unreadable_entries_are_dead_lettered_without_blocking_the_rest(
    redis, keys, key_prefix: str, database_url: str
) -> None:
    life = Lifecycle()
    ids = await append(redis, keys, [life.create(), b"not json", b'{"session_id": 1}', b"\xff\xfe", life.start()])
    async with services(redis, key_prefix, database_url) as audit:
        await eventually(lambda: drained(audit), what="audit caught up")
        assert [e["version"] for e in await audit.events(life.session_id, None)] == [1, 2]
    rows = await fetch(database_url, "SELECT stream_id, raw FROM audit_dead_letters WHERE stream_id = ANY($1)",
                       ids)
    assert sorted((r["stream_id"], r["raw"]) for r in rows) == sorted(
        zip(ids[1:4], [b"not json", b'{"session_id": 1}', b"\xff\xfe"], strict=True))


async def test_an_entry_postgres_refuses_goes_to_the_dead_letters_and_the_rest_is_stored(
    redis, keys, key_prefix: str, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A NUL in an update message (PostgreSQL's jsonb refuses U+0000) once made the audit skip
    every entry of the session silently; now it is kept, counted, logged and alerted on."""
    from actors.outbox.audit import AUDIT_DEAD_LETTERS

    life = Lifecycle()
    good = [life.create(), life.start(), life.switch()]
    bad = json.loads(life.pause())
    bad["events"][0]["data"]["note"] = "a\x00b"
    bad["state"]["metadata"] = {"x": "a\x00b"}
    poison = json.dumps(bad).encode()
    assert b"\\u0000" in poison
    ids = await append(redis, keys, [*good, poison, life.resume(), life.complete()])
    before = AUDIT_DEAD_LETTERS._value.get()
    async with services(redis, key_prefix, database_url) as audit:
        await eventually(lambda: drained(audit), what="audit caught up")
        stored = await audit.events(life.session_id, None)
    assert [e["version"] for e in stored] == [1, 2, 3, 5, 6]
    rows = await fetch(database_url, "SELECT * FROM audit_dead_letters WHERE session_id = $1", life.session_id)
    assert [(r["stream_id"], r["raw"]) for r in rows] == [(ids[3], poison)]
    assert "Unicode" in rows[0]["error"] or "\\u0000" in rows[0]["error"], rows[0]["error"]
    assert AUDIT_DEAD_LETTERS._value.get() == before + 1
    assert any(r.levelname == "ERROR" and ids[3] in r.getMessage() and "audit_dead_letters" in r.getMessage()
               for r in caplog.records)


async def test_restore_returns_the_last_snapshot_marked_restored(
    redis, keys, key_prefix: str, database_url: str
) -> None:
    life = Lifecycle()
    msgs = [life.create(), life.start(), life.switch(), life.pause()]
    await append(redis, keys, msgs)
    gone = Lifecycle()
    await append(redis, keys, [gone.create(), gone.delete()])
    async with services(redis, key_prefix, database_url) as audit:
        await eventually(lambda: drained(audit), what="audit caught up")
        state = await audit.restore(life.session_id)
        assert state is not None
        assert state.version == 4 and state.status == "paused"
        assert state.participants[0].time_used_ms == 1_500 and state.active_index == 1
        assert state.metadata == {"restored_from_audit": True}
        assert await audit.restore(gone.session_id) is None
        assert await audit.restore(str(uuid.uuid4())) is None


async def test_devices_register_move_and_delete(redis, key_prefix: str, database_url: str) -> None:
    async with services(redis, key_prefix, database_url) as audit:
        token = f"tok-{uuid.uuid4().hex}"
        await audit.register_device("alice", token, "ios")
        with pytest.raises(DeviceTokenTaken):  # alice's until she deletes it
            await audit.register_device("bob", token, "android")
        await audit.register_device("bob", token, "android", take_over=True)  # an admin moved it
        await audit.delete_device("alice", token)  # not alice's any more: no effect
        rows = await fetch(database_url, "SELECT sub, platform FROM devices WHERE token = $1", token)
        assert [(r["sub"], r["platform"]) for r in rows] == [("bob", "android")]
        await audit.delete_device("bob", token)
        assert await fetch(database_url, "SELECT 1 FROM devices WHERE token = $1", token) == []
        await audit.ping()


async def test_starts_while_postgres_is_down_and_reports_it_unavailable(redis, key_prefix: str) -> None:
    down = "postgresql://postgres@127.0.0.1:9/nowhere"  # nothing listens on port 9
    async with services(redis, key_prefix, down, backoff_cap_s=0.2) as audit:
        with pytest.raises(Unavailable):
            await audit.ping()
        with pytest.raises(Unavailable):
            await audit.register_device("alice", "tok", "ios")
        with pytest.raises(Unavailable):
            await audit.events(str(uuid.uuid4()), None)
        await append(redis, Keys(key_prefix), Lifecycle().full()[:1])
        await eventually(lambda: _true(audit.worker.retries >= 2), what="the worker retrying")
        assert (await audit.lag()).oldest_id is not None  # kept for later, not dropped


async def _true(value: bool) -> bool:
    return value


async def test_a_restored_session_keeps_its_idempotency_window(
    redis, keys, key_prefix: str, database_url: str
) -> None:
    """The audit copy carries each change's command id (issue 9, defect 7): a session restored
    from it answers a retried key with the first outcome instead of applying it again."""
    from kairos import Create, ParticipantSpec, Start, Switch, apply
    from kairos.wire import update_message

    sid, now = str(uuid.uuid4()), 1_790_000_000_000
    create = Create(session_id=sid, sync_mode="per_participant", owner="o", command_id="k-create",
                    participants=(ParticipantSpec(str(uuid.uuid4()), 60_000),
                                  ParticipantSpec(str(uuid.uuid4()), 60_000)))
    state, msgs = None, []
    for k, cmd in enumerate([create, Start(), *(Switch(command_id=f"k{n}") for n in range(70))]):
        r = apply(state, cmd, now + 100 * k)
        state = r.state
        msgs.append(update_message(state, r.events, now + 100 * k, sid))
    await append(redis, keys, msgs)
    async with services(redis, key_prefix, database_url) as audit:
        await eventually(lambda: drained(audit), what="audit caught up")
        restored = await audit.restore(sid)
    assert restored is not None and restored.version == state.version
    assert restored.recent == state.recent  # all 71 keys: younger than the 300 s window
    replay = apply(restored, Switch(command_id="k-create"), now + 100 * 80)
    assert replay.replayed and replay.outcome == {"version": 1, "expired_participant_id": None}
