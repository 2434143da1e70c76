"""Redis outages under a live host (issue 9): a Redis of the test's own is killed or frozen and
brought back; the host keeps its liveness through short blips and applies every deadline it
missed soon after Redis returns, without any client command."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from actors.host import Host
from kairos.commands import Start
from kairos.session import Status
from tests.redis_server import RedisServer
from tests.runtime.conftest import create_command
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client_of(server: RedisServer) -> aioredis.Redis:
    """A client that fails a call at once when Redis is away (no retries, like the service's)."""
    return aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)


async def test_deadline_missed_while_redis_was_down_is_applied_soon_after_it_returns(
        tmp_path: Path, key_prefix: str) -> None:
    ttl_ms = 5000
    with RedisServer(tmp_path) as server:
        client = client_of(server)
        try:
            async with Host(client, key_prefix=key_prefix, lease_ttl_ms=ttl_ms) as h:
                incarnation = h.incarnation
                sid = str(uuid.uuid4())
                await h.ask(sid, create_command(sid, bank_ms=1000))
                await h.ask(sid, Start())
                server.kill()
                # the deadline passes while Redis is down: the tick's write fails, the actor closes
                await eventually(lambda: not h.is_local(sid), 5, "the failed tick closed the actor")
                await anyio.to_thread.run_sync(server.start)
                back = time.monotonic()

                async def expired() -> bool:
                    try:
                        return (await h.get(sid)).status is Status.EXPIRED
                    except Exception:
                        return False

                await eventually(expired, ttl_ms / 1000 + 10, "the missed deadline applied")
                took = time.monotonic() - back
                assert h.incarnation == incarnation  # a blip, not a lost liveness: no takeover helped
                state = await h.get(sid)
        finally:
            await client.aclose()
    assert took <= ttl_ms / 1000 + 1.5, took
    assert state.participants[0].has_expired and state.participants[0].time_used_ms == 1000  # not more


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_redis_blip_shorter_than_ttl_minus_a_renewal_period_keeps_the_liveness(
        fault: str, tmp_path: Path, key_prefix: str) -> None:
    # The bound is TTL - 2 renewal periods; renewal retried every 50 ms once it failed
    # does better: up to TTL - 1 period - 0.3 s (renewing only every period, the last attempt
    # inside such a blip is followed by one after the key expired)
    ttl_ms, period_ms = 3000, 600  # renewals every TTL/5
    blip_s = (ttl_ms - period_ms) / 1000 - 0.3
    with RedisServer(tmp_path) as server:
        client = client_of(server)
        probe = client_of(server)
        try:
            async with Host(client, key_prefix=key_prefix, lease_ttl_ms=ttl_ms) as h:
                incarnation = h.incarnation
                alive = h.keys.liveness(incarnation)
                # the worst moment: a renewal is due (the key has TTL - period left), so the
                # last renewal that got through was one period before the blip starts
                await eventually(lambda: _pttl_at_most(probe, alive, ttl_ms - period_ms + 20), 5,
                                 "a renewal about to be due")
                await anyio.to_thread.run_sync(_blip, server, fault, blip_s)
                # renewed after the blip: the key has more left than it would without a renewal
                await eventually(lambda: _pttl_at_least(probe, alive, ttl_ms - period_ms), ttl_ms / 1000,
                                 "a renewal after the blip")
                assert h.incarnation == incarnation
        finally:
            await probe.aclose()
            await client.aclose()


def _blip(server: RedisServer, fault: str, seconds: float) -> None:
    """Make Redis unreachable for `seconds` (in a thread: the host's loop keeps running)."""
    if fault == "kill":
        server.kill()
        time.sleep(seconds - 0.03)  # the outage itself (restarting takes ~30 ms more)
        server.start()
    else:
        server.freeze()
        time.sleep(seconds)  # the outage itself
        server.thaw()


async def _pttl_at_most(probe: aioredis.Redis, key: str, ms: int) -> bool:
    return 0 <= await probe.pttl(key) <= ms


async def _pttl_at_least(probe: aioredis.Redis, key: str, ms: int) -> bool:
    try:
        return await probe.pttl(key) >= ms
    except Exception:  # Redis still coming back
        return False
