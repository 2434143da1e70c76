"""End to end on a real `kairos serve`: the REST lifecycle lands in the audit (readable through
`/events`), device routes feed push, and a session whose checkpoint Redis lost is restored."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis as syncredis

from actors.keys import Keys
from tests.audit.fake_fcm import FakeFcm
from tests.servers import KairosServer, server_env

pytestmark = pytest.mark.slow

LIFECYCLE = ["session_created", "session_started", "cycle_switched", "cycle_switched",
             "cycle_switched", "session_paused", "session_resumed", "session_completed"]


def wait_for(check: Callable[[], Any], within: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling a condition on another process


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
