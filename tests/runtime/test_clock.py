"""One time base for the cluster (issue 9): each instance measures its offset to Redis TIME and
charges time with it; it claims nothing while that offset is unknown or too uncertain."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from actors.clock import ClusterClock, local_ns
from kairos.errors import Unavailable
from tests.runtime.conftest import create_command, hosts
from tests.servers import KairosServer, make_token, server_env
from tests.waiting import wait_for

pytestmark = pytest.mark.anyio

SKEW_MS = 700


async def redis_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


class SteppingClock:
    """An injected local clock (ns) that moves `step_ms` on every read, as a slow round trip."""

    def __init__(self, step_ms: float) -> None:
        self.now = local_ns()
        self.step = int(step_ms * 1_000_000)

    def __call__(self) -> int:
        self.now += self.step
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms * 1_000_000


async def test_a_skewed_local_clock_is_corrected_to_redis_time(redis: Any) -> None:
    clock = ClusterClock(local=lambda: local_ns() + SKEW_MS * 1_000_000)
    assert not clock.synced() and clock.error_ms() == float("inf")
    await clock.measure(redis)
    assert clock.synced() and clock.error_ms() <= clock.max_error_ms
    assert clock.offset_ns is not None and abs(clock.offset_ns / 1e6 + SKEW_MS) < 50
    before = await redis_ms(redis)
    now = clock.now_ms()
    after = await redis_ms(redis)
    assert before - clock.error_ms() - 1 <= now <= after + clock.error_ms() + 1


async def test_an_offset_measured_with_too_much_delay_is_not_trusted(redis: Any) -> None:
    clock = ClusterClock(local=SteppingClock(step_ms=50))  # every round trip reads 50 ms
    await clock.measure(redis)
    assert clock.offset_ns is not None and clock.error_ms() >= 25
    assert not clock.synced()


async def test_a_kept_offset_grows_uncertain_with_age_and_the_lowest_delay_wins(redis: Any) -> None:
    local = SteppingClock(step_ms=2)  # 1 ms error per measurement
    clock = ClusterClock(local=local)
    await clock.measure(redis)
    assert clock.synced() and clock.error_ms() < 2
    local.advance(200_000)  # 200 s without a measurement: + 40 ms drift allowance
    assert not clock.synced()
    local.step = 20 * 1_000_000  # a worse round trip than the kept one, once aged, still wins
    await clock.measure(redis)
    assert clock.error_ms() < 11 and clock.synced()


async def test_an_unsynced_host_claims_no_session(redis: Any, key_prefix: str) -> None:
    async with hosts(redis, key_prefix, 1, clock_synced=lambda: False, ask_deadline_ms=300) as (host,):
        sid = str(uuid.uuid4())
        with pytest.raises(Unavailable):
            await host.ask(sid, create_command(sid))
        assert not host.is_local(sid) and await host.owner(sid) is None
        assert await host.sweeper.sweep_once() == 0


@pytest.mark.slow
def test_an_instance_whose_clock_error_is_above_the_bound_is_not_ready(redis_url: str, key_prefix: str) -> None:
    env = server_env(redis_url, None, key_prefix, KAIROS_CLOCK_MAX_ERROR_MS="0.000001")
    with KairosServer(env) as srv, httpx.Client(timeout=10) as http:
        r = http.get(f"{srv.url}/ready")
        assert r.status_code == 503 and "clock not synced" in r.json()["error"], r.text


@pytest.mark.slow
def test_a_session_handed_to_an_instance_with_a_skewed_clock_is_charged_exact_time(
    redis_url: str, key_prefix: str
) -> None:
    """Two real instances, one whose wall clock is 700 ms ahead (KAIROS_TEST_CLOCK_SKEW_MS): a
    turn started on one and switched on the other after a drain is charged the real time."""
    env = server_env(redis_url, None, key_prefix, KAIROS_RATE_LIMIT_GENERAL="0")
    with KairosServer(env) as a, KairosServer({**env, "KAIROS_TEST_CLOCK_SKEW_MS": str(SKEW_MS)}) as b:
        a.wait_ready()
        b.wait_ready()
        user = {"Authorization": f"Bearer {make_token('alice')}"}
        admin = {"Authorization": f"Bearer {make_token('ops', 'admin')}"}
        sid = str(uuid.uuid4())
        body = {"session_id": sid, "sync_mode": "per_participant", "total_time_ms": 600_000,
                "participants": [{"participant_id": str(uuid.uuid4()), "total_time_ms": 300_000}
                                 for _ in range(2)]}
        with httpx.Client(timeout=10) as http:
            assert http.post(f"{a.url}/v1/sessions", json=body, headers=user).status_code == 201
            sent = time.monotonic()
            r = http.post(f"{a.url}/v1/sessions/{sid}/start", headers=user)
            started = time.monotonic()
            assert r.status_code == 200, r.text

            def owner() -> str | None:
                data = http.get(f"{a.url}/admin/sessions/{sid}/owner", headers=admin).json()["data"]
                return data and data["instance_id"]

            assert owner() == a.env["KAIROS_INSTANCE_ID"]
            assert http.post(f"{a.url}/admin/drain", headers=admin).status_code in (200, 202)
            wait_for(lambda: owner() == b.env["KAIROS_INSTANCE_ID"], what="the hand-off to the skewed instance")
            asked = time.monotonic()
            r = http.post(f"{b.url}/v1/sessions/{sid}/switch", json={}, headers=user)
            answered = time.monotonic()
            assert r.status_code == 200, r.text
        charged = r.json()["data"]["participants"][0]["time_used_ms"]
        tolerance = 2 * 20  # each instance's offset is within the 20 ms bound
        assert (asked - started) * 1000 - tolerance <= charged <= (answered - sent) * 1000 + tolerance, (
            charged, (asked - started) * 1000, (answered - sent) * 1000)
