"""Chaos (issue 9): three real `kairos serve` processes and a Redis of the test's own (AOF always)
under random SIGKILL, SIGSTOP + SIGCONT, SIGTERM, drain and one Redis restart, while clients
switch with an Idempotency-Key (retrying each key until it is acknowledged, on any instance) and
watch every session over WebSocket. Afterwards: every acknowledged key was applied exactly once,
versions are contiguous (each written and published once), every short-bank session expired
within TTL + 1.5 s of its deadline (of Redis answering again, if the deadline fell in the outage),
and every socket saw every version or got a STATE_SYNC covering the gap.

The fault schedule comes from a seed that is printed (set KAIROS_CHAOS_SEED to replay one)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from actors.keys import Keys
from bench.loops import Switcher, Watcher, create_running
from bench.redis_server import RedisServer
from kairos.wire import parse_iso_ms
from tests.failover.conftest import Cluster, resume
from tests.failover.kit import total_cycles
from tests.servers import server_env
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

TTL_MS = 1000
CHAOS_S = 45  # faults are injected for this long
SWITCHED, SHORT = 6, 8  # sessions switched all along / sessions left to run out


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CarefulWatcher(Watcher):
    """A `Watcher` that, like a careful client, asks again when its re-sync was answered with an
    ERROR (the instance could not read the session just then, e.g. Redis was restarting)."""

    async def _on_frame(self, ws: Any, frame: dict[str, Any]) -> None:
        if frame.get("type") == "ERROR" and "request_id" not in frame:
            await anyio.sleep(0.2)  # a client's back-off before asking again
            await ws.send(json.dumps({"type": "RECONNECT", "last_version": self.last_version}))
            return
        await super()._on_frame(ws, frame)


class Faults:
    """Injects one fault at a time into the cluster (blocking: run in a thread)."""

    def __init__(self, cluster: Cluster, redis_server: RedisServer, rng: random.Random) -> None:
        self.cluster, self.redis, self.rng = cluster, redis_server, rng
        self.done: Counter[str] = Counter()
        self.redis_down: tuple[float, float] | None = None  # wall-clock ms: Redis killed, back

    def run(self, seconds: float) -> None:
        stop = time.monotonic() + seconds
        redis_at = time.monotonic() + self.rng.uniform(0.3, 0.6) * seconds
        while time.monotonic() < stop:
            time.sleep(self.rng.uniform(0.5, 2.0))  # the schedule: time between two faults
            if self.redis_down is None and time.monotonic() >= redis_at:
                self.restart_redis()
                continue
            kind = self.rng.choice(["kill", "freeze", "term", "drain"])
            srv = self.rng.choice(self.cluster.servers)
            getattr(self, kind)(srv)
            self.done[kind] += 1
            self.cluster.heal()

    def kill(self, srv: Any) -> None:
        srv.kill()

    def freeze(self, srv: Any) -> None:
        os.kill(srv.pid, signal.SIGSTOP)
        time.sleep(self.rng.uniform(0.3, 2.5))  # frozen this long: sometimes past the TTL
        resume(srv)

    def term(self, srv: Any) -> None:
        srv.stop(timeout_s=20)

    def drain(self, srv: Any) -> None:
        r = httpx.post(f"{srv.url}/admin/drain", headers=self.cluster.headers(admin=True), timeout=10)
        assert r.status_code == 202, r.text  # heal() then stops the draining instance and restarts it

    def restart_redis(self) -> None:
        down = time.time() * 1000
        self.redis.kill()
        time.sleep(self.rng.uniform(1.0, 2.0))  # the outage itself
        self.redis.start()
        self.redis_down = (down, time.time() * 1000)
        self.done["redis restart"] += 1
        self.cluster.heal()


async def test_chaos_loses_and_doubles_nothing_and_every_clock_and_socket_keeps_up(
        tmp_path: Path, database_url: str) -> None:
    seed = int(os.environ.get("KAIROS_CHAOS_SEED") or random.randrange(1 << 30))
    print(f"\nchaos seed {seed} (KAIROS_CHAOS_SEED={seed} replays this schedule)")
    rng = random.Random(seed)
    prefix = f"kc:{seed}:"
    with RedisServer(tmp_path) as redis_server:
        # a consumer group of our own that never acknowledges: the audit cannot trim the outbox,
        # which is where the checks below read every write back from
        client = aioredis.Redis.from_url(redis_server.url)
        await client.xgroup_create(Keys(prefix).outbox, "chaos-check", id="0", mkstream=True)
        await client.aclose()
        env = server_env(redis_server.url, database_url, prefix, KAIROS_LEASE_TTL_MS=str(TTL_MS),
                         KAIROS_RATE_LIMIT_GENERAL="0", KAIROS_RATE_LIMIT_SWITCH="0")
        cluster = Cluster(env)
        try:
            cluster.start()
            await _chaos(cluster, redis_server, rng, prefix)
        finally:
            cluster.stop()


async def _chaos(cluster: Cluster, redis_server: RedisServer, rng: random.Random, prefix: str) -> None:
    urls = [s.url for s in cluster.servers]
    ws_urls = [s.ws_url for s in cluster.servers]
    faults = Faults(cluster, redis_server, rng)
    async with httpx.AsyncClient(headers=cluster.headers(), timeout=30) as http:
        switched = [(await create_running(http, urls[i % 3]))["session_id"] for i in range(SWITCHED)]
        deadlines: dict[str, int] = {}
        for i in range(SHORT):  # deadlines spread over the chaos
            bank_ms = int(3000 + i * (CHAOS_S - 5) * 1000 / SHORT)
            started = await create_running(http, urls[i % 3], bank_ms=bank_ms)
            deadlines[started["session_id"]] = parse_iso_ms(started["cycle_started_at"]) + bank_ms
        switchers = [Switcher(http, sid, urls[i % 3:] + urls[:i % 3]) for i, sid in enumerate(switched)]
        watchers = [CarefulWatcher(sid, ws_urls[i % 3:] + ws_urls[:i % 3], cluster.user)
                    for i, sid in enumerate(switched + list(deadlines))]
        async with anyio.create_task_group() as tg:
            for w in watchers:
                tg.start_soon(w.run)
            for w in watchers:
                with anyio.fail_after(15):
                    await w.connected.wait()
            for s in switchers:
                tg.start_soon(s.run)
            await anyio.to_thread.run_sync(faults.run, CHAOS_S)
            await anyio.to_thread.run_sync(cluster.heal)
            for s in switchers:
                await s.stop(60)
            finals = {sid: (await http.get(f"{urls[0]}/v1/sessions/{sid}")).json()["data"]
                      for sid in switched + list(deadlines)}
            try:
                await eventually(lambda: all(w.last_version == finals[w.sid]["version"] for w in watchers), 20,
                                 "every socket caught up")
            except AssertionError:
                behind = [await _why_behind(w, finals[w.sid]["version"], cluster, redis_server.url, prefix)
                          for w in watchers if w.last_version != finals[w.sid]["version"]]
                raise AssertionError("sockets behind:\n" + "\n".join(behind)) from None
            for w in watchers:
                w.stopped = True
            tg.cancel_scope.cancel()
        # acknowledged keys sent again change nothing (keys the idempotency window still holds:
        # it keeps at most 128 ids per session, and a quiet machine acknowledges ~1,000 here)
        for s in switchers:
            for n in (max(0, len(s.acked) - 100), len(s.acked) - 1):
                r = await http.post(f"{urls[1]}/v1/sessions/{s.sid}/switch", headers={"Idempotency-Key": f"{s.sid[:8]}-{n}"})
                assert r.status_code == 200, r.text
        replayed = {s.sid: (await http.get(f"{urls[2]}/v1/sessions/{s.sid}")).json()["data"] for s in switchers}
    written = await _outbox_versions(redis_server.url, prefix)

    acked = sum(len(s.acked) for s in switchers)
    lateness = {sid: _lateness(written[sid], deadline, faults.redis_down) for sid, deadline in deadlines.items()}
    syncs = sum(len(w.of_type("STATE_SYNC")) for w in watchers)
    print(f"faults: {dict(faults.done)}; acknowledged switches {acked} "
          f"({sum(len(s.failures) for s in switchers)} failed attempts retried); "
          f"longest stretch without an ack {max(s.longest_gap() for s in switchers):.2f} s; "
          f"worst expiry lateness {max(lateness.values()):.2f} s; "
          f"STATE_SYNCs {syncs}, socket reconnects {sum(len(w.closes) for w in watchers)}")

    for s in switchers:
        state = finals[s.sid]
        versions = [v for _, v in s.acked]
        assert sorted(versions) == list(range(3, 3 + len(versions))), s.sid  # contiguous, none twice
        assert total_cycles(state) == len(versions) and state["version"] == 2 + len(versions)
        assert replayed[s.sid]["version"] == state["version"]
    for sid, state in finals.items():
        assert [v for v, _ in written[sid]] == list(range(1, state["version"] + 1)), sid  # each once
    for sid in deadlines:
        assert finals[sid]["status"] == "expired", sid
        assert lateness[sid] <= TTL_MS / 1000 + 1.5, (sid, lateness[sid])
    for w in watchers:
        _assert_no_silent_gap(w)


async def _outbox_versions(url: str, prefix: str) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Per session, (version, message) of every outbox entry in order, with the entry's time
    (Redis clock when the fenced write ran) as `at_ms`."""
    client = aioredis.Redis.from_url(url)
    out: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    try:
        for entry_id, fields in await client.xrange(Keys(prefix).outbox):
            msg = json.loads(fields[b"m"])
            msg["at_ms"] = int(entry_id.split(b"-")[0])
            out.setdefault(msg["session_id"], []).append((msg["version"], msg))
    finally:
        await client.aclose()
    return out


def _lateness(written: list[tuple[int, dict[str, Any]]], deadline_ms: int,
              redis_down: tuple[float, float] | None) -> float:
    """Seconds between the deadline (or Redis answering again, if the deadline fell while it was
    down) and the write that applied the expiry."""
    applied = next(m["at_ms"] for _, m in written if (m.get("state") or {}).get("status") == "expired")
    due = deadline_ms
    if redis_down is not None and redis_down[0] <= deadline_ms <= redis_down[1]:
        due = redis_down[1]
    return (applied - due) / 1000


def _assert_no_silent_gap(w: Watcher) -> None:
    """Every version after the first one seen arrived as a STATE_UPDATE, or a STATE_SYNC at or
    past it arrived after the socket's last frame before it."""
    seen = [(f["type"], f["state"]["version"]) for _, f in w.frames
            if f.get("type") in ("STATE_UPDATE", "STATE_SYNC") and isinstance((f.get("state") or {}).get("version"), int)]
    updates = {v for kind, v in seen if kind == "STATE_UPDATE"}
    for v in range(seen[0][1] + 1, seen[-1][1] + 1):
        if v in updates:
            continue
        before = max(i for i, (_, u) in enumerate(seen) if u < v)
        assert any(kind == "STATE_SYNC" and u >= v for kind, u in seen[before + 1:]), \
            f"{w.sid}: version {v} never reached the socket and no STATE_SYNC covered it: {_around(w, v)}"


async def _why_behind(w: Watcher, final: int, cluster: Cluster, redis_url: str, prefix: str) -> str:
    """What a socket left behind looked like: its frames and closes, and on the instance it is
    connected to, whether the session is subscribed and what the fan-out and WebSocket logged."""
    lines = [f"{w.sid[:8]}: last seen {w.last_version}, final {final}, on {w.url}, "
             f"frames {_around(w, w.last_version or 0)}, closes {w.closes[-3:]}"]
    client = aioredis.Redis.from_url(redis_url)
    try:
        channel = Keys(prefix).channel(w.sid)
        numsub = dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0)
        names = [c.get("name") for c in await client.client_list(_type="pubsub")]
    finally:
        await client.aclose()
    lines.append(f"  subscribers of its channel: {numsub}; pub/sub clients: {names}")
    srv = next((s for s in cluster.servers if s.ws_url == w.url), None)
    if srv is not None:
        alive = srv.proc is not None and srv.proc.poll() is None
        logged = [line for line in srv.log_tail(4000).splitlines()
                  if ("kairos.fanout" in line or "kairos.ws" in line or w.sid in line)
                  and "websocket connected" not in line and "websocket disconnected" not in line]
        lines.append(f"  {srv.env['KAIROS_INSTANCE_ID']} alive {alive}; its fan-out/ws log:")
        lines += [f"    {line[:400]}" for line in logged[-15:]]
    return "\n".join(lines)


def _around(w: Watcher, version: int) -> list[tuple[str, Any, Any]]:
    """The frames a socket got around `version` (for a failure message)."""
    frames = [(u[-10:], f.get("type"), (f.get("state") or {}).get("version", f.get("code"))) for u, f in w.frames]
    at = next((i for i, (_, _, v) in enumerate(frames) if isinstance(v, int) and v >= version), len(frames))
    return frames[max(0, at - 4):at + 8]
