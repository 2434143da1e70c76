"""Redis restart under real `kairos serve` processes: a Redis of the test's own (AOF `always`) is
killed and started again on the same port; both instances serve again by themselves within
seconds and nothing acknowledged before is lost."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.failover.kit import create_running, total_cycles, wait_until
from tests.redis_server import RedisServer
from tests.servers import KairosServer, server_env

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


async def test_instances_serve_again_after_redis_restarts_and_keep_what_they_acknowledged(
        tmp_path: Path, database_url: str, key_prefix: str) -> None:
    with RedisServer(tmp_path) as redis_server:
        await _restart_under_two_instances(redis_server, database_url, key_prefix)


async def _restart_under_two_instances(redis_server: RedisServer, database_url: str, key_prefix: str) -> None:
    env = server_env(redis_server.url, database_url, key_prefix,
                     KAIROS_LEASE_TTL_MS="1000", KAIROS_RATE_LIMIT_GENERAL="0", KAIROS_RATE_LIMIT_SWITCH="0")
    with KairosServer(env) as a, KairosServer(env) as b:
        a.wait_ready()
        b.wait_ready()
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {a.token('r')}"}, timeout=15) as http:
            sid = (await create_running(http, a.url))["session_id"]
            acked = []
            for i in range(6):  # through the owner and through the other instance (forwarded)
                r = await http.post(f"{(a, b)[i % 2].url}/v1/sessions/{sid}/switch",
                                    headers={"Idempotency-Key": f"before-{i}"})
                assert r.status_code == 200, r.text
                acked.append(r.json()["data"]["version"])
            redis_server.kill()
            r = await http.post(f"{b.url}/v1/sessions/{sid}/switch", headers={"Idempotency-Key": "down"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE"
            redis_server.start()  # same data (AOF always), same address

            last: list[str] = []

            async def switch_ok(url: str, key: str) -> bool:
                try:
                    r = await http.post(f"{url}/v1/sessions/{sid}/switch", headers={"Idempotency-Key": key},
                                        timeout=3)
                except httpx.HTTPError as e:
                    last[:] = [repr(e)]
                    return False
                last[:] = [f"{r.status_code} {r.text}"]
                return r.status_code == 200

            for srv, name in ((a, "a"), (b, "b")):
                try:
                    await wait_until(lambda srv=srv, name=name: switch_ok(srv.url, f"after-{name}"), 15,
                                     f"{name} serving again")
                except AssertionError as e:
                    raise AssertionError(f"{e}; last answer {last}\n-- a:\n{a.log_tail(60)}\n-- b:\n{b.log_tail(60)}") from None
            for srv in (a, b):
                await wait_until(lambda srv=srv: _ready(http, srv.url), 15, "ready again")
            r = await http.get(f"{b.url}/v1/sessions/{sid}")
            assert r.status_code == 200, r.text
            state = r.json()["data"]
            # the 503 command may or may not have been applied before Redis died: replay it
            r = await http.post(f"{b.url}/v1/sessions/{sid}/switch", headers={"Idempotency-Key": "down"})
            assert r.status_code == 200, r.text
            before_replay = r.json()["data"]["version"]
            r = await http.post(f"{a.url}/v1/sessions/{sid}/switch", headers={"Idempotency-Key": "before-0"})
            assert r.status_code == 200, r.text
            final = (await http.get(f"{a.url}/v1/sessions/{sid}")).json()["data"]
    assert state["version"] >= acked[-1] + 2  # everything acknowledged before, plus the two after
    assert final["version"] == before_replay  # an acknowledged key is remembered, not applied again
    assert total_cycles(final) == final["version"] - 2  # every switch applied exactly once


async def _ready(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(f"{url}/ready", timeout=2)).status_code == 200
    except httpx.HTTPError:
        return False


