"""Failover and drain with three real `kairos serve` processes.

Three instances share one Redis and one PostgreSQL (started here, embedded, unless --redis-url /
--database-url are given), lease TTL 2 s. Each repetition measures:

1. unavailability after SIGKILL of the owner: a client loops switches of a session owned by A
   through B (a failed attempt is retried with the same Idempotency-Key); window = the longest
   time without an acknowledged switch (target <= TTL + 1 s);
2. expiry lateness after failover: a session owned by A whose participant runs out 2 s after its
   start; A is killed right after the start, a WebSocket client on B receives TIME_EXPIRED;
   lateness = server time of the expiry - the true deadline;
3. drain of 1,000 live sessions owned by C (POST /admin/drain) while 48 client loops switch
   sessions through all three instances: drain time (C's `kairos_drain_seconds`, and the
   client's view: POST -> C owns nothing) (target < 5 s), failed requests (target 0).

Reports the percentiles over the repetitions (default 5), as ratios to the lease TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import uuid
from contextlib import ExitStack
from typing import Any

import anyio
import httpx

from bench.loops import Switcher, Watcher, create_running, wait_until
from bench.report import BenchError, Report
from bench.servers import KairosServer, server_env, stores
from bench.target import add_store_arguments
from kairos.wire import parse_iso_ms


class Bench:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.servers = [KairosServer(env, ready_timeout_s=60) for _ in range(3)]
        self.user = self.servers[0].token("bench")
        self.admin = {"Authorization": f"Bearer {self.servers[0].token('bench-admin', 'admin')}"}

    def start(self) -> None:
        for s in self.servers:
            s.start()
        for s in self.servers:
            s.wait_ready(60)

    def restart(self, i: int) -> None:
        old = self.servers[i]
        old.stop(timeout_s=15)
        self.servers[i] = KairosServer(self.env, port=old.port, ready_timeout_s=60).start()
        self.servers[i].wait_ready(60)

    def stop(self) -> None:
        for s in self.servers:
            s.stop(timeout_s=15)


async def kill_rep(b: Bench, ttl_s: float) -> tuple[float, float]:
    """(unavailability window s, expiry lateness s) for one SIGKILL of the owner."""
    a, via, _ = b.servers
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {b.user}"}, timeout=30) as http:
        sid = (await create_running(http, a.url))["session_id"]
        switcher = Switcher(http, sid, [via.url])
        async with anyio.create_task_group() as tg:
            tg.start_soon(switcher.run)
            await wait_until(lambda: len(switcher.acked) >= 20, 30, "switches")
            doomed = await create_running(http, a.url, bank_ms=2000)
            deadline_ms = parse_iso_ms(doomed["cycle_started_at"]) + 2000
            watcher = Watcher(doomed["session_id"], [via.ws_url], b.user)
            tg.start_soon(watcher.run)
            await watcher.connected.wait()
            note("killing the owner")
            a.kill()
            killed = time.monotonic()
            await wait_until(lambda: switcher.acks_after(killed) and watcher.of_type("TIME_EXPIRED"),
                             ttl_s + 20, "recovery")
            await switcher.stop(30)
            watcher.stopped = True
            tg.cancel_scope.cancel()
    # the longest stretch without an acknowledged switch (an answer already on its way when the
    # owner died may arrive just after the kill: "kill -> next ack" would not see the outage)
    window = switcher.longest_gap()
    lateness = (watcher.of_type("TIME_EXPIRED")[0]["timestamp"] - deadline_ms) / 1000
    return window, lateness


async def drain_rep(b: Bench, sessions: int, loops: int) -> tuple[float, float, int, int]:
    """(server drain s, client-seen drain s, failed requests, acknowledged switches during drain)."""
    a, bb, c = b.servers
    c_id = c.env["KAIROS_INSTANCE_ID"]
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {b.user}"}, timeout=30,
                                 limits=httpx.Limits(max_connections=200)) as http:
        sem = anyio.Semaphore(32)
        sids: list[str] = []

        async def make() -> None:
            async with sem:
                sids.append((await create_running(http, c.url))["session_id"])

        async with anyio.create_task_group() as tg:
            for _ in range(sessions):
                tg.start_soon(make)
        urls = [s.url for s in (a, bb, c)]
        switchers = [Switcher(http, sid, urls[i % 3:] + urls[:i % 3]) for i, sid in enumerate(sids[:loops])]
        async with anyio.create_task_group() as tg:
            for s in switchers:
                tg.start_soon(s.run)
            await wait_until(lambda: all(len(s.acked) >= 2 for s in switchers), 30, "traffic")
            before = sum(len(s.failures) for s in switchers)
            t0 = time.monotonic()
            acked0 = sum(len(s.acked) for s in switchers)
            note(f"{len(sids)} sessions on c, {len(switchers)} loops running: draining c")
            r = await http.post(f"{c.url}/admin/drain", headers=b.admin)
            assert r.status_code == 202, r.text

            async def drained() -> bool:
                live = (await http.get(f"{a.url}/admin/instances", headers=b.admin)).json()["data"]
                mine = [i for i in live if i["instance_id"] == c_id]
                return bool(mine) and mine[0]["draining"] and mine[0]["actors"] == 0

            await wait_until(drained, 60, "drain")
            seen = time.monotonic() - t0
            note(f"drained in {seen:.3f} s")
            # keep switching after the hand-off: every loop gets acknowledged at least twice more
            t1 = time.monotonic()
            await wait_until(lambda: all(s.acks_after(t1) >= 2 for s in switchers), 30, "traffic after")
            for s in switchers:
                await s.stop(30)
            tg.cancel_scope.cancel()
        failed = sum(len(s.failures) for s in switchers) - before
        acked = sum(len(s.acked) for s in switchers) - acked0
        metrics = (await http.get(f"{c.url}/metrics")).text
    m = re.search(r"^kairos_drain_seconds_sum ([0-9.e+-]+)$", metrics, re.MULTILINE)
    server = float(m.group(1)) if m else float("nan")
    return server, seen, failed, acked


class LoopLag:
    """How late a 5 ms sleep on this event loop wakes up, at worst, while `run()` is going:
    `worst` in wall-clock time (on a busy machine this includes time the process was not
    scheduled at all) and `worst_cpu` in CPU time this thread spent meanwhile (the stall our own
    code caused: what starves renewal, the inbox and timers)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_cpu = 0.0

    async def run(self) -> None:
        """Measure until cancelled."""
        while True:
            t, cpu = time.monotonic(), time.thread_time()
            await anyio.sleep(0.005)
            self.worst = max(self.worst, time.monotonic() - t - 0.005)
            self.worst_cpu = max(self.worst_cpu, time.thread_time() - cpu)


async def populated(host: Any, n: int) -> list[str]:
    """`n` new sessions created on an in-process `actors.host.Host` (64 at a time, so their
    writes share round trips); their ids."""
    from kairos.commands import Create, ParticipantSpec

    sids = [str(uuid.uuid4()) for _ in range(n)]

    async def create(chunk: list[str]) -> None:
        for sid in chunk:
            ps = tuple(ParticipantSpec(str(uuid.uuid4()), 60_000) for _ in range(2))
            await host.ask(sid, Create(session_id=sid, sync_mode="per_participant", participants=ps, owner="bench"))

    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(create, sids[i::64])
    return sids


_progress: list[Report] = []  # the running report, for progress lines from the repetitions


def note(msg: str) -> None:
    """A progress line (stderr, silent with --quiet)."""
    if _progress:
        _progress[-1].step(msg)


QUICK: dict[str, Any] = {"reps": 1, "sessions": 100, "loops": 8}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench failover`."""
    p.add_argument("--reps", type=int, default=5, help="repetitions of kill + drain")
    p.add_argument("--ttl-ms", type=int, default=2000, help="KAIROS_LEASE_TTL_MS of the three instances")
    p.add_argument("--sessions", type=int, default=1000, help="live sessions on the drained instance")
    p.add_argument("--loops", type=int, default=48, help="client switch loops during the drain")
    add_store_arguments(p)


def run(args: argparse.Namespace, report: Report) -> None:
    """Start the three instances, run the repetitions, record the windows (seconds)."""
    if min(args.reps, args.ttl_ms, args.sessions, args.loops) < 1:
        raise BenchError("--reps, --ttl-ms, --sessions and --loops must be positive")
    ttl_s = args.ttl_ms / 1000
    with ExitStack() as stack:
        _progress.append(report)
        stack.callback(_progress.remove, report)
        redis_url, database_url = stack.enter_context(stores(args.redis_url, args.database_url))
        report.redis_url, report.database_url = redis_url, database_url
        env = server_env(redis_url, database_url, f"bench-failover:{os.getpid()}:{time.time_ns()}:",
                         KAIROS_LEASE_TTL_MS=str(args.ttl_ms), KAIROS_RATE_LIMIT_GENERAL="0",
                         KAIROS_RATE_LIMIT_SWITCH="0", KAIROS_DRAIN_TIMEOUT_S="30")
        b = Bench(env)
        stack.callback(b.stop)
        report.step("starting three instances")
        b.start()
        for s in b.servers:
            report.add_server(s.url)
        windows, lateness, drains, seen, failed, acked = [], [], [], [], [], []
        for rep in range(args.reps):
            try:
                w, late = asyncio.run(kill_rep(b, ttl_s))
                b.restart(0)
                d, s, f, n = asyncio.run(drain_rep(b, args.sessions, args.loops))
                b.restart(2)
            except BaseException:
                for srv in b.servers:
                    print(f"--- {srv.env['KAIROS_INSTANCE_ID']} ({srv.log_path}):\n{srv.log_tail(15)}",
                          file=sys.stderr)
                raise
            windows.append(w)
            lateness.append(late)
            drains.append(d)
            seen.append(s)
            failed.append(f)
            acked.append(n)
            report.step(f"rep {rep + 1}: unavailable {w:.3f} s, expiry late {late:.3f} s, drain {d:.3f} s "
                        f"(client saw {s:.3f} s), failed {f} of {n + f}")
    report.latency("ttl", [ttl_s] * args.reps, "lease TTL (baseline)", unit="s")
    report.latency("unavailable", windows, f"unavailable after SIGKILL (<= {ttl_s + 1:g} s)",
                   unit="s", baseline="ttl")
    report.latency("expiry_late", lateness, "expiry lateness after failover", unit="s", baseline="ttl")
    report.latency("drain", drains, f"drain of {args.sessions} sessions, server (< 5 s)", unit="s",
                   baseline="ttl")
    report.latency("drain_client", seen, "drain as the client saw it", unit="s", baseline="ttl")
    report.value("failed_during_drain", sum(failed), "", "failed requests during drain (target 0)")
    report.value("acked_during_drain", sum(acked), "", "acknowledged switches during drain")
    ok = max(windows) <= ttl_s + 1 and max(drains) < 5 and sum(failed) == 0
    report.note("all targets met" if ok else "some targets missed")
