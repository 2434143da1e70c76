"""End to end on a real `kairos serve`: the REST lifecycle lands in the audit (readable through
`/events`), device routes feed push, and a session whose checkpoint Redis lost is restored."""

from __future__ import annotations

import tempfile
import time
import uuid

import httpx
import pytest
import redis as syncredis

from actors.keys import Keys
from tests.audit.conftest import start_pgserver
from tests.audit.fake_fcm import FakeFcm
from tests.servers import KairosServer, server_env
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

LIFECYCLE = ["session_created", "session_started", "cycle_switched", "cycle_switched",
             "cycle_switched", "session_paused", "session_resumed", "session_completed"]



def test_rest_lifecycle_events_devices_push_and_restore(
    redis_url: str, database_url: str, key_prefix: str, fake_fcm: FakeFcm, service_account: str
) -> None:
    env = server_env(redis_url, database_url, key_prefix, KAIROS_RATE_LIMIT_GENERAL="0",
                     KAIROS_RATE_LIMIT_SWITCH="0", KAIROS_FCM_CREDENTIALS=service_account,
                     KAIROS_FCM_ENDPOINT=fake_fcm.url)
    sid = str(uuid.uuid4())
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    with KairosServer(env) as srv:
        srv.wait_ready()
        owner = {"Authorization": f"Bearer {srv.token('owner-1')}"}
        as_bob = {"Authorization": f"Bearer {srv.token(bob)}"}
        with httpx.Client(base_url=srv.url, timeout=10) as http:
            r = http.post("/v1/devices", json={"token": f"bob-phone-{sid}", "platform": "android"},
                          headers=as_bob)
            assert r.status_code == 201, r.text
            body = {"session_id": sid, "sync_mode": "per_participant", "participants": [
                {"participant_id": alice, "total_time_ms": 60_000},
                {"participant_id": bob, "total_time_ms": 60_000}]}
            r = http.post("/v1/sessions", json=body, headers=owner)
            assert r.status_code == 201, r.text
            for action in ("start", "switch", "switch", "switch", "pause", "resume", "complete"):
                r = http.post(f"/v1/sessions/{sid}/{action}", headers=owner)
                assert r.status_code == 200, (action, r.text)

            def history() -> list[dict]:
                r = http.get(f"/v1/sessions/{sid}/events", headers=owner)
                assert r.status_code == 200, r.text
                events = r.json()["data"]
                return events if len(events) >= len(LIFECYCLE) else []

            events = wait_for(history, what="the lifecycle in the audit")
            assert [e["type"] for e in events] == LIFECYCLE
            assert [e["version"] for e in events] == sorted(e["version"] for e in events)
            assert events[2]["participant_id"] == bob  # the first switch hands the turn to bob
            page = http.get(f"/v1/sessions/{sid}/events", params={"after_version": events[4]["version"]},
                            headers=owner).json()["data"]
            assert [e["type"] for e in page] == LIFECYCLE[5:]
            assert http.get(f"/v1/sessions/{sid}/events", headers=as_bob).status_code == 200

            # bob's phone: "your turn" twice, then paused/resumed/completed. Changes that reach
            # push in one batch collapse to the latest (as the phone would show them anyway).
            def bobs() -> list[str]:
                got = [m["data"]["event"] for m in fake_fcm.sent if m["token"] == f"bob-phone-{sid}"]
                return got if got and got[-1] == "session_completed" else []

            got = wait_for(bobs, what="bob's notifications")
            expected = iter(["cycle_switched", "cycle_switched", "session_paused", "session_resumed",
                             "session_completed"])
            assert all(event in expected for event in got), got  # in order, none invented
            assert http.delete(f"/v1/devices/bob-phone-{sid}", headers=as_bob).status_code == 204
        srv.kill()  # a crash: the next instance finds no live actor in memory

    # Redis lost the checkpoint: the next read restores the last audited snapshot.
    client = syncredis.Redis.from_url(redis_url)
    try:
        assert client.delete(Keys(key_prefix).checkpoint(sid)) == 1
    finally:
        client.close()
    with KairosServer(env) as srv:
        srv.wait_ready()
        r = httpx.get(f"{srv.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {srv.token('owner-1')}"})
        assert r.status_code == 200, r.text
        state = r.json()["data"]
        assert state["status"] == "completed" and state["metadata"]["restored_from_audit"] is True


def _metric(url: str, name: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def test_postgres_outage_never_slows_commands_and_loses_no_event(
    redis_url: str, key_prefix: str
) -> None:
    import asyncio

    import asyncpg

    folder = tempfile.mkdtemp(prefix="kairos-e2e-outage-")
    pg = start_pgserver(folder)
    pg_url = pg.get_uri()
    env = server_env(redis_url, pg_url, key_prefix, KAIROS_RATE_LIMIT_GENERAL="0",
                     KAIROS_RATE_LIMIT_SWITCH="0")
    sessions = [str(uuid.uuid4()) for _ in range(20)]
    try:
        with KairosServer(env) as srv, httpx.Client(base_url=srv.url, timeout=10) as http:
            srv.wait_ready()
            owner = {"Authorization": f"Bearer {srv.token('owner-1')}"}

            def command(path: str, body: dict | None = None) -> float:
                t = time.perf_counter()
                r = http.post(path, json=body, headers=owner)
                elapsed = time.perf_counter() - t
                assert r.status_code in (200, 201), (path, r.status_code, r.text)
                return elapsed

            for sid in sessions:
                command("/v1/sessions", {"session_id": sid, "sync_mode": "per_participant",
                                         "participants": [{"participant_id": str(uuid.uuid4()),
                                                           "total_time_ms": 3_600_000} for _ in range(2)]})
                command(f"/v1/sessions/{sid}/start")
            before = [command(f"/v1/sessions/{sessions[i % 20]}/switch") for i in range(60)]

            pg.cleanup()  # PostgreSQL goes away
            down_at = time.monotonic()
            during = [command(f"/v1/sessions/{sessions[i % 20]}/switch") for i in range(200)]
            assert httpx.get(f"{srv.url}/ready", timeout=5).status_code == 503  # and says so
            lag = wait_for(lambda: (_metric(srv.url, "kairos_audit_lag_seconds") or 0) >= 8,
                           within=30, what="an outage of ~10 s")
            lag = _metric(srv.url, "kairos_audit_lag_seconds")
            pg = start_pgserver(folder)
            back_at = time.monotonic()

            expected = len(sessions) * 2 + len(before) + len(during)

            async def count() -> tuple[int, int]:
                conn = await asyncpg.connect(pg_url)
                try:
                    row = await conn.fetchrow(
                        "SELECT count(*) AS n, count(DISTINCT (session_id, version, event_type)) AS d "
                        "FROM sync_events WHERE session_id = ANY($1::text[])", sessions)
                    return row["n"], row["d"]
                finally:
                    await conn.close()

            wait_for(lambda: asyncio.run(count())[0] >= expected, within=30, what="audit caught up")
            caught_up = time.monotonic() - back_at
            assert asyncio.run(count()) == (expected, expected)  # every event exactly once
            print(f"\n[e2e outage] down {back_at - down_at:.1f} s, {len(during)} switches meanwhile; "
                  f"switch p50/max before {_pct(before, 50) * 1000:.1f}/{max(before) * 1000:.1f} ms, "
                  f"during {_pct(during, 50) * 1000:.1f}/{max(during) * 1000:.1f} ms; "
                  f"audit lag at restart {lag:.1f} s; caught up {caught_up:.2f} s after restart")
    finally:
        pg.cleanup()
