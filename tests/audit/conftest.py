"""Fixtures for the audit suite: an async Redis client, a poll helper, SQL helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from actors.keys import Keys
from tests.audit.fake_fcm import fake_fcm, service_account  # noqa: F401 (fixtures)
from tests.waiting import eventually  # noqa: F401 (re-exported for audit tests)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def append(redis: aioredis.Redis, keys: Keys, messages: list[bytes]) -> list[str]:
    """XADD messages to the outbox as the actor's write script does (field `m`)."""
    pipe = redis.pipeline(transaction=False)
    for m in messages:
        pipe.xadd(keys.outbox, {"m": m})
    return [i.decode() if isinstance(i, bytes) else i for i in await pipe.execute()]


def start_pgserver(folder: str) -> Any:
    """Start (or restart) an embedded PostgreSQL of our own in `folder` (blocking, ~1-3 s)."""
    import pgserver

    return pgserver.get_server(folder, cleanup_mode="stop")
