"""Runtime test helpers: an async Redis client, hosts on a test prefix, clocks, polling."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from kairos.commands import Create, ParticipantSpec
from tests.waiting import eventually as wait_for  # noqa: F401 (re-exported)


@pytest.fixture
def anyio_backend() -> str:
    """Redis tests run on asyncio only (redis-py's asyncio client); scheduling tests override."""
    return "asyncio"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


class FakeClock:
    """An injected wall clock (epoch ms) that moves only when told."""

    def __init__(self, start_ms: int = 1_764_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def create_command(session_id: str, *, n: int = 2, bank_ms: int = 60_000, mode: str = "per_participant",
                   **extra: Any) -> Create:
    """A valid Create for `n` participants with `bank_ms` each."""
    participants = tuple(ParticipantSpec(str(uuid.uuid4()), bank_ms) for _ in range(n))
    return Create(session_id=session_id, sync_mode=mode, participants=participants, owner="alice", **extra)


@asynccontextmanager
async def hosts(redis: Any, key_prefix: str, n: int, **options: Any) -> AsyncIterator[list[Any]]:
    """`n` started hosts sharing one Redis prefix (one client each, like separate processes)."""
    import redis.asyncio as aioredis

    from actors.host import Host

    url_kwargs = redis.connection_pool.connection_kwargs
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            client = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
                connection_class=redis.connection_pool.connection_class, **url_kwargs))
            stack.push_async_callback(client.aclose)
            out.append(await stack.enter_async_context(Host(client, key_prefix=key_prefix, **options)))
        yield out
