"""Issue 5 with real processes: three `kairos serve` instances on loopback sharing Redis and
PostgreSQL (lease TTL 1 s); owners are SIGKILLed, SIGSTOPped and drained for real."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from kairos.wire import parse_iso_ms
from tests.failover.conftest import LEASE_TTL_MS, Cluster, wait_until
from tests.failover.kit import ChannelLog, Switcher, Watcher, create_running, owner_of, total_cycles
from tests.servers import KairosServer

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

TTL_S = LEASE_TTL_MS / 1000


@asynccontextmanager
async def client(c: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers=c.headers(), timeout=15) as http:
        yield http


async def test_sigkill_of_the_owner_loses_no_acknowledged_switch(healthy: Cluster, redis_url: str) -> None:
    a, b, _ = healthy.servers
    admin = healthy.headers(admin=True)
    async with client(healthy) as http:
        sid = (await create_running(http, a.url))["session_id"]
        assert await owner_of(http, b.url, sid, admin) == a.env["KAIROS_INSTANCE_ID"]
        log = ChannelLog(redis_url, healthy.env["KAIROS_KEY_PREFIX"], [sid])
        switcher = Switcher(http, sid, [b.url])
        async with anyio.create_task_group() as tg:
            tg.start_soon(log.run)
            await log.ready.wait()
            tg.start_soon(switcher.run)
            await wait_until(lambda: len(switcher.acked) >= 20, 10, "switches through b")
            a.kill()
            killed = time.monotonic()
            await wait_until(lambda: switcher.acks_after(killed) >= 20, 15, "switches after the kill")
            await switcher.stop()
            state = (await http.get(f"{b.url}/v1/sessions/{sid}")).json()["data"]
            # on a Redis Cluster a publication reaches the log's node over the cluster bus: later
            await wait_until(lambda: log.versions[sid][-1:] == [state["version"]], 5, "the last publication")
            tg.cancel_scope.cancel()
        assert await owner_of(http, b.url, sid, admin) in {s.env["KAIROS_INSTANCE_ID"] for s in healthy.servers[1:]}
    acked = [v for _, v in switcher.acked]
    assert total_cycles(state) == len(acked)  # none lost, none applied twice
    assert state["version"] == 2 + len(acked)
    assert sorted(acked) == list(range(3, 3 + len(acked)))
    # each switch published once (on a cluster the start's publication may arrive after the
    # log subscribed: it crosses the cluster bus)
    assert [v for v in log.versions[sid] if v >= 3] == list(range(3, state["version"] + 1))
    assert switcher.longest_gap() < 2 * TTL_S + 1, switcher.longest_gap()


async def test_expiry_fires_after_sigkill_of_the_owner_with_no_client_activity(healthy: Cluster) -> None:
    a, b, c = healthy.servers
    async with client(healthy) as http:
        body_state = await create_running(http, a.url, bank_ms=2000)
        sid = body_state["session_id"]
        deadline_ms = parse_iso_ms(body_state["cycle_started_at"]) + 2000
        watcher = Watcher(sid, [b.ws_url], healthy.user)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await watcher.connected.wait()
            a.kill()
            expired = await wait_until(lambda: watcher.of_type("TIME_EXPIRED"), 2 + TTL_S + 5, "TIME_EXPIRED on b")
            received_ms = time.time() * 1000
            watcher.stopped = True
            tg.cancel_scope.cancel()
        state = (await http.get(f"{c.url}/v1/sessions/{sid}")).json()["data"]
    assert state["status"] == "expired"
    assert expired[0]["state"]["status"] == "expired"
    # server time of the expiry and the client's receipt, both against the true deadline
    assert expired[0]["timestamp"] - deadline_ms < (TTL_S + 1.5) * 1000
    assert received_ms - deadline_ms < (TTL_S + 1.5) * 1000


async def test_frozen_owner_writes_nothing_and_versions_never_go_backwards(
        healthy: Cluster, redis_url: str) -> None:
    a, b, c = healthy.servers
    admin = healthy.headers(admin=True)
    async with client(healthy) as http:
        sid = (await create_running(http, a.url))["session_id"]
        old = {i["instance_id"]: i["incarnation"] for i in
               (await http.get(f"{b.url}/admin/instances", headers=admin)).json()["data"]}
        a_id = a.env["KAIROS_INSTANCE_ID"]
        log = ChannelLog(redis_url, healthy.env["KAIROS_KEY_PREFIX"], [sid])
        switcher = Switcher(http, sid, [b.url])
        on_a, on_b = Watcher(sid, [a.ws_url], healthy.user), Watcher(sid, [b.ws_url], healthy.user)
        reads: list[int] = []
        frozen = anyio.Event()

        async def reader() -> None:
            # sequential GETs round robin over every instance (the frozen one times out)
            async with httpx.AsyncClient(headers=healthy.headers(), timeout=0.5) as short:
                i = 0
                while True:
                    url = (a, b, c)[i % 3].url
                    i += 1
                    try:
                        r = await short.get(f"{url}/v1/sessions/{sid}")
                    except httpx.HTTPError:
                        continue
                    assert r.status_code == 200, r.text
                    reads.append(r.json()["data"]["version"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(log.run)
            await log.ready.wait()
            for w in (on_a, on_b):
                tg.start_soon(w.run)
                await w.connected.wait()
            tg.start_soon(switcher.run)
            tg.start_soon(reader)
            await wait_until(lambda: len(switcher.acked) >= 10, 10, "switches through b")
            os.kill(a.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            frozen.set()
            # frozen for 2 x TTL, and b's switches flow again meanwhile (it took the session over)
            await wait_until(lambda: time.monotonic() - stopped_at >= 2 * TTL_S
                             and switcher.acks_after(stopped_at + TTL_S) >= 5, 15, "takeover while frozen")
            os.kill(a.pid, signal.SIGCONT)
            resumed = time.monotonic()

            async def rejoined() -> bool:
                live = (await http.get(f"{b.url}/admin/instances", headers=admin)).json()["data"]
                return any(i["instance_id"] == a_id and i["incarnation"] != old[a_id] for i in live)

            await wait_until(rejoined, 10, "the old owner to rejoin under a new incarnation")
            await wait_until(lambda: switcher.acks_after(resumed) >= 10 and len(reads) > 30, 10, "traffic after resume")
            await switcher.stop()
            await wait_until(lambda: on_a.last_version is not None and on_b.last_version is not None
                             and on_a.last_version >= switcher.acked[-1][1]
                             and on_b.last_version >= switcher.acked[-1][1], 10, "watchers caught up")
            on_a.stopped = on_b.stopped = True
            tg.cancel_scope.cancel()
        final = (await http.get(f"{c.url}/v1/sessions/{sid}")).json()["data"]
        metrics = (await http.get(f"{a.url}/metrics")).text
        owner = (await http.get(f"{b.url}/admin/sessions/{sid}/owner", headers=admin)).json()["data"]
    assert frozen.is_set()
    assert owner["incarnation"] != old[a_id]  # the frozen incarnation holds nothing
    assert _metric(metrics, "kairos_liveness_lost_total") >= 1  # it noticed and dropped its actors
    published = log.versions[sid]
    assert published == sorted(set(published))  # no version written twice (a zombie write would)
    assert published[-1] == final["version"]
    assert published == list(range(published[0], final["version"] + 1))
    acked = [v for _, v in switcher.acked]
    assert len(acked) == len(set(acked)) and set(acked) <= set(published)
    assert total_cycles(final) == len(acked)
    assert reads == sorted(reads), "a GET saw an older version after a newer one"
    for w in (on_a, on_b):
        assert w.versions == sorted(w.versions), f"WebSocket versions went backwards: {w.versions}"


async def test_drain_hands_every_session_off_with_no_failed_request(healthy: Cluster) -> None:
    a, b, c = healthy.servers
    admin = healthy.headers(admin=True)
    c_id = c.env["KAIROS_INSTANCE_ID"]
    async with client(healthy) as http:
        sids = [(await create_running(http, c.url))["session_id"] for _ in range(20)]
        for sid in sids[:3]:
            assert await owner_of(http, a.url, sid, admin) == c_id
        switchers = [Switcher(http, sid, [s.url for s in (a, b, c)][i % 3:] + [s.url for s in (a, b, c)][:i % 3])
                     for i, sid in enumerate(sids)]
        # sockets on the drained instance first; after 1012 they move to a, then b
        watchers = [Watcher(sid, [c.ws_url, a.ws_url, b.ws_url], healthy.user) for sid in sids[:5]]
        async with anyio.create_task_group() as tg:
            for w in watchers:
                tg.start_soon(w.run)
                await w.connected.wait()
            for s in switchers:
                tg.start_soon(s.run)
            await wait_until(lambda: all(len(s.acked) >= 3 for s in switchers), 15, "traffic on every session")
            receivers = await _incarnations(http, a.url, admin, a, b)
            assert len(receivers) == 2
            r = await http.post(f"{c.url}/admin/drain", headers=admin)
            assert r.status_code == 202, r.text
            drained_at = time.monotonic()

            async def drained() -> bool:
                ready = await http.get(f"{c.url}/ready")
                owners = [await owner_of(http, a.url, sid, admin) for sid in sids]
                return ready.status_code == 503 and c_id not in owners and None not in owners

            await wait_until(drained, 15, "every session owned by a or b")
            await wait_until(lambda: all(s.acks_after(drained_at) >= 3 for s in switchers)
                             and all(any(code == 1012 for _, code in w.closes) for w in watchers),
                             15, "traffic after the drain and 1012 on c's sockets")
            for s in switchers:
                await s.stop()
            finals = {sid: (await http.get(f"{a.url}/v1/sessions/{sid}")).json()["data"] for sid in sids}
            await wait_until(lambda: all(w.last_version == finals[w.sid]["version"] for w in watchers),
                             10, "watchers re-synced to the final version")
            for w in watchers:
                w.stopped = True
            # the receivers kept renewing their liveness throughout (a receiver whose background
            # tasks died in the hand-off burst would have rejoined under a new incarnation)
            assert await _incarnations(http, a.url, admin, a, b) == receivers
            tg.cancel_scope.cancel()
    assert c.stop(timeout_s=15) == 0  # SIGTERM after the drain: nothing left to hand off, clean exit
    assert [f for s in switchers for f in s.failures] == []  # zero non-2xx, zero transport errors
    for s in switchers:
        assert total_cycles(finals[s.sid]) == len(s.acked)
    for w in watchers:
        assert w.closes[0] == (c.ws_url, 1012)
        assert w.versions == sorted(w.versions)
        assert any(f.get("type") == "STATE_SYNC" for url, f in w.frames if url != c.ws_url)  # re-synced


async def _incarnations(http: httpx.AsyncClient, url: str, admin: dict[str, str],
                        *servers: KairosServer) -> dict[str, str]:
    ids = {s.env["KAIROS_INSTANCE_ID"] for s in servers}
    live = (await http.get(f"{url}/admin/instances", headers=admin)).json()["data"]
    return {i["instance_id"]: i["incarnation"] for i in live if i["instance_id"] in ids}


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0
