"""Failover suite fixtures: three real `kairos serve` processes on loopback sharing Redis and
PostgreSQL, started once per module; tests kill, freeze and drain them for real (by pid), and
`cluster.heal()` brings every instance back before the next test."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.failover.kit import wait_until
from tests.servers import KairosServer, server_env

__all__ = ["Cluster", "LEASE_TTL_MS", "wait_until"]

LEASE_TTL_MS = 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Cluster:
    """Three instances of one deployment (same Redis prefix); restartable one by one."""

    def __init__(self, env: dict[str, str], n: int = 3) -> None:
        self.env = env
        self.servers = [KairosServer(env) for _ in range(n)]
        self.admin = self.servers[0].token("failover-admin", "admin")
        self.user = self.servers[0].token("failover-user")

    def start(self) -> None:
        for srv in self.servers:
            srv.start()
        for srv in self.servers:
            srv.wait_ready()

    def stop(self) -> None:
        for srv in self.servers:
            resume(srv)
            srv.stop(timeout_s=10)

    def heal(self) -> None:
        """Every instance running and ready again (a killed/drained one restarts on its port)."""
        for i, srv in enumerate(self.servers):
            resume(srv)
            if srv.proc is None or srv.proc.poll() is not None or _draining(srv):
                srv.stop(timeout_s=10)
                fresh = KairosServer(self.env, port=srv.port)
                fresh.start()
                self.servers[i] = fresh
        for srv in self.servers:
            srv.wait_ready()

    def by_instance(self, instance_id: str) -> KairosServer:
        return next(s for s in self.servers if s.env["KAIROS_INSTANCE_ID"] == instance_id)

    def headers(self, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin if admin else self.user}"}


def resume(srv: KairosServer) -> None:
    """SIGCONT a process we may have frozen (harmless if it runs)."""
    if srv.proc is not None and srv.proc.poll() is None:
        os.kill(srv.pid, signal.SIGCONT)


def _draining(srv: KairosServer) -> bool:
    try:
        return httpx.get(f"{srv.url}/ready", timeout=2).status_code != 200
    except httpx.HTTPError:
        return True


@pytest.fixture(scope="module")
def cluster(redis_url: str, database_url: str) -> Iterator[Cluster]:
    prefix = f"kf:{uuid.uuid4().hex[:10]}:"
    env = server_env(redis_url, database_url, prefix,
                     KAIROS_LEASE_TTL_MS=str(LEASE_TTL_MS), KAIROS_RATE_LIMIT_GENERAL="0",
                     KAIROS_RATE_LIMIT_SWITCH="0", KAIROS_DRAIN_TIMEOUT_S="10")
    c = Cluster(env)  # instance ids are test-{port}: a restarted instance keeps its name
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    """The module's cluster with all three instances up (restarting any the last test broke)."""
    cluster.heal()
    return cluster
