"""Redis Sentinel failover under real `kairos serve` processes (KAIROS_REDIS_MIN_REPLICAS_ACK=1).

A master, two replicas and three sentinels of the test's own; two instances reach Redis only
through the sentinels; clients switch several sessions through both instances, retrying each
Idempotency-Key until it is acknowledged, and a WebSocket client watches each session. The master
is SIGKILLed, the sentinels promote a replica, and afterwards no acknowledged switch is lost, none
is applied twice, every clock is exactly what the last acknowledged answer said, and no version a
watcher saw came with two different contents. Unavailability is printed."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx
import pytest

from bench.redis_topology import Replicated
from tests.failover.kit import Switcher, Watcher, create_running, total_cycles, wait_until
from tests.servers import KairosServer, server_env

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

SESSIONS = 4


async def test_master_failover_loses_no_acknowledged_switch(tmp_path: Path, database_url: str, key_prefix: str) -> None:
    with Replicated(tmp_path, replicas=2, sentinels=3) as topo:
        env = server_env(topo.sentinel_url, database_url, key_prefix, KAIROS_REDIS_MIN_REPLICAS_ACK="1",
                         KAIROS_LEASE_TTL_MS="2000", KAIROS_RATE_LIMIT_GENERAL="0", KAIROS_RATE_LIMIT_SWITCH="0")
        with KairosServer(env) as a, KairosServer(env) as b:
            a.wait_ready()
            b.wait_ready()
            urls = [a.url, b.url]
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {a.token('ha')}"}, timeout=15) as http:
                sids = [(await create_running(http, urls[i % 2]))["session_id"] for i in range(SESSIONS)]
                switchers = [Switcher(http, sid, urls) for sid in sids]
                watchers = [Watcher(sid, [(b, a)[i % 2].ws_url], a.token("ha")) for i, sid in enumerate(sids)]
                old_master = topo.announced_master()
                async with anyio.create_task_group() as tg:
                    for w in watchers:
                        tg.start_soon(w.run)
                        await w.connected.wait()
                    for s in switchers:
                        tg.start_soon(s.run)
                    await wait_until(lambda: all(len(s.acked) >= 10 for s in switchers), 20, "switches before")
                    killed = topo.kill_master()
                    await wait_until(lambda: topo.announced_master() != old_master, 20, "a replica promoted")
                    promoted = time.monotonic()
                    await wait_until(lambda: all(s.acks_after(promoted) >= 10 for s in switchers), 30,
                                     "switches after the failover")
                    for s in switchers:
                        await s.stop()
                    await wait_until(lambda: all(w.last_version == s.acked[-1][1]
                                                 for w, s in zip(watchers, switchers, strict=True)),
                                     15, "watchers caught up")
                    for w in watchers:
                        w.stopped = True
                    tg.cancel_scope.cancel()
                finals = [(await http.get(f"{b.url}/v1/sessions/{sid}")).json()["data"] for sid in sids]
    gaps = [s.longest_gap() for s in switchers]
    print(f"\nsentinel failover: promoted {promoted - killed:.2f} s after the kill; longest stretch without "
          f"an acknowledged switch per session: {', '.join(f'{g:.2f}' for g in gaps)} s; "
          f"{sum(len(s.acked) for s in switchers)} switches acknowledged, "
          f"{sum(len(s.failures) for s in switchers)} failed attempts retried")
    for s, final in zip(switchers, finals, strict=True):
        acked = [v for _, v in s.acked]
        assert sorted(acked) == list(range(3, 3 + len(acked)))  # no acknowledged version reissued
        assert final["version"] == 2 + len(acked)  # none lost
        assert total_cycles(final) == len(acked)  # none applied twice
        assert _clocks(final) == _clocks(s.last)  # clocks exactly as last acknowledged
    for w, final in zip(watchers, finals, strict=True):
        seen: dict[int, list[tuple[object, ...]]] = {}
        for _, frame in w.frames:
            state = frame.get("state")
            if frame.get("type") in ("STATE_UPDATE", "STATE_SYNC") and state:
                assert seen.setdefault(state["version"], _clocks(state)) == _clocks(state)  # never reissued
        assert seen[final["version"]] == _clocks(final)
    assert max(gaps) < (promoted - killed) + 5


def _clocks(state: dict[str, object]) -> list[tuple[object, ...]]:
    """What a participant's clock is made of, minus the live projection of the running one."""
    return [(p["participant_id"], p["time_used_ms"], p["cycle_count"], p["is_active"])  # type: ignore[index]
            for p in state["participants"]]  # type: ignore[union-attr]
