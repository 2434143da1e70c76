"""Redis outages under a live host (issue 9): a Redis of the test's own is killed or frozen and
brought back; the host keeps its liveness through short blips and applies every deadline it
missed soon after Redis returns, without any client command."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

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
                server.start()
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
