"""Web suite fixtures: real `kairos serve` processes (tests/servers.py), started once per module."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.servers import KairosServer, server_env
from tests.waiting import wait_for  # noqa: F401 (re-exported)


@pytest.fixture(scope="module")
def module_prefix() -> str:
    """A Redis key namespace shared by the servers of one test module."""
    return f"kw:{uuid.uuid4().hex[:10]}:"


@pytest.fixture(scope="module")
def server(redis_url: str, database_url: str, module_prefix: str) -> Iterator[KairosServer]:
    """One instance with real Redis and PostgreSQL; generous general limit, switch limit off."""
    env = server_env(redis_url, database_url, module_prefix,
                     KAIROS_RATE_LIMIT_GENERAL="100000", KAIROS_RATE_LIMIT_SWITCH="0")
    with KairosServer(env) as srv:
        srv.wait_ready()
        yield srv


def at_a_fresh_rate_window() -> None:
    """Wait until at least 15 s of the current one-minute rate-limit window remain, so a test's
    burst is counted in one window (the general limit uses fixed windows on the wall clock)."""
    wait_for(lambda: time.time() % 60 < 45, 20, "a fresh part of the minute")


def new_id() -> str:
    return str(uuid.uuid4())


def chess_body(session_id: str | None = None, n: int = 2, **extra: Any) -> dict[str, Any]:
    """A per_participant session body with `n` fresh participants (5 min each, 3 s increment)."""
    body: dict[str, Any] = {
        "session_id": session_id or new_id(),
        "sync_mode": "per_participant",
        "participants": [{"participant_id": new_id(), "total_time_ms": 300_000} for _ in range(n)],
        "total_time_ms": 600_000,
        "increment_ms": 3000,
    }
    body.update(extra)
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def http(server: KairosServer) -> Iterator[httpx.Client]:
    """A plain httpx client on the module's server, authenticated as `host-1`."""
    with httpx.Client(base_url=server.url, headers=bearer(server.token("host-1")), timeout=10) as c:
        yield c
