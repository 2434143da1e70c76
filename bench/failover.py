"""Failover, Redis outages and drain with real `kairos serve` processes.

The instances share one Redis and one PostgreSQL (started here, embedded, unless --redis-url /
--database-url are given). Measured (each part can be skipped):

1. for every lease TTL of --ttl-ms (default 1, 2, 3, 5 and 10 s; three fresh instances each), per
   repetition: unavailability after SIGKILL of the owner -- a client loops switches of a session
   owned by A through B (a failed attempt is retried with the same Idempotency-Key); window = the
   longest time without an acknowledged switch (target <= TTL + 1 s) -- and expiry lateness after
   failover: a session owned by A whose participant runs out 2 s after its start; A is killed
   right after the start, a WebSocket client on B receives TIME_EXPIRED; lateness = server time
   of the expiry - the true deadline. Both as ratios to the TTL (the baseline);
2. expiry lateness after Redis outages (--outages, seconds; a Redis of its own with AOF always,
   killed and restarted; two instances at --outage-ttl-ms): sessions whose deadlines fall inside
   the outage; lateness = when a client first sees every one expired - when Redis answered again
   (target <= TTL + 1.5 s); an outage longer than the TTL makes every instance rejoin;
3. drain of --sessions live sessions owned by C (POST /admin/drain) while --loops client loops
   switch sessions through all three instances (those of the first TTL): drain time (C's
   `kairos_drain_seconds`, and the client's view: POST -> C owns nothing) (target < 5 s),
   failed requests (target 0);
4. drain and stop at scale: an in-process host with --drain-actors live actors drains to a
   `kairos serve` process, cut at --drain-timeout-s (as KAIROS_DRAIN_TIMEOUT_S), then stops:
   time to return after the cut and to stop, worst event-loop stall in CPU time of the process
   (target: below half a renewal period, its baseline), liveness kept.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.loops import Switcher, Watcher, create_running, wait_until
from bench.redis_server import RedisServer
from bench.report import BenchError, Report
from bench.servers import KairosServer, server_env, stores
from bench.target import add_store_arguments
from kairos.wire import parse_iso_ms


class Bench:
    def __init__(self, env: dict[str, str], n: int = 3) -> None:
        self.env = env
        self.servers = [KairosServer(env, ready_timeout_s=60) for _ in range(n)]
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


async def outage_rep(b: Bench, redis_server: RedisServer, outage_s: float, sessions: int = 6) -> float:
    """Seconds from Redis answering again until a client saw every session expired, for sessions
    whose deadlines fall inside an outage of `outage_s` (Redis killed, restarted with its AOF)."""
    urls = [s.url for s in b.servers]
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {b.user}"}, timeout=30) as http:
        sids = [(await create_running(http, urls[i % len(urls)], bank_ms=1000))["session_id"]
                for i in range(sessions)]
        note(f"Redis down for {outage_s:g} s")
        await anyio.to_thread.run_sync(redis_server.kill)
        await anyio.sleep(outage_s)  # the outage itself
        await anyio.to_thread.run_sync(redis_server.start)
        back = time.monotonic()
        seen: dict[str, float] = {}

        async def all_expired() -> bool:
            for i, sid in enumerate(sids):
                if sid in seen:
                    continue
                try:
                    r = await http.get(f"{urls[i % len(urls)]}/v1/sessions/{sid}", timeout=2)
                except httpx.HTTPError:
                    continue
                if r.status_code == 200 and r.json()["data"]["status"] == "expired":
                    seen[sid] = time.monotonic()
            return len(seen) == len(sids)

        await wait_until(all_expired, 120, "every session expired")
    return max(seen.values()) - back


async def scale_drain(redis_url: str, database_url: str | None, actors: int, timeout_s: float,
                      ttl_ms: int) -> dict[str, float]:
    """An in-process host with `actors` live actors drains to a `kairos serve` process, cut at
    `timeout_s`, then stops."""
    import redis.asyncio as aioredis

    from actors.host import Host

    prefix = f"bench-drain:{os.getpid()}:{time.time_ns()}:"
    client = aioredis.Redis.from_url(redis_url)
    out: dict[str, float] = {}
    with KairosServer(server_env(redis_url, database_url, prefix, KAIROS_LEASE_TTL_MS=str(ttl_ms)),
                      ready_timeout_s=60) as receiver:
        receiver.wait_ready(60)
        lag = LoopLag()
        try:
            async with anyio.create_task_group() as tg:
                async with Host(client, key_prefix=prefix, lease_ttl_ms=ttl_ms, switch_rate_per_s=0) as h:
                    t = time.monotonic()
                    await populated(h, actors)
                    note(f"{actors} actors created in {time.monotonic() - t:.1f} s: draining")
                    incarnation = h.incarnation
                    tg.start_soon(lag.run)
                    started = time.monotonic()
                    with anyio.move_on_after(timeout_s):
                        await h.drain()
                    out["drain_s"] = time.monotonic() - started
                    out["left"] = h.actor_count()
                    out["kept_liveness"] = float(h.incarnation == incarnation)
                    stopping = time.monotonic()
                out["stop_s"] = time.monotonic() - stopping
                out["lag_s"], out["lag_cpu_s"] = lag.worst, lag.worst_cpu
                tg.cancel_scope.cancel()
        finally:
            await client.aclose()
    return out


_progress: list[Report] = []  # the running report, for progress lines from the repetitions


def note(msg: str) -> None:
    """A progress line (stderr, silent with --quiet)."""
    if _progress:
        _progress[-1].step(msg)


# --quick: one TTL and the drain under load; the outage and scale parts are left out (each starts
# servers of its own: too long for a smoke run)
QUICK: dict[str, Any] = {"reps": 1, "ttl_ms": "1000", "outages": "", "sessions": 100, "loops": 8,
                         "drain_actors": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench failover`."""
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    p.add_argument("--ttl-ms", default="1000,2000,3000,5000,10000",
                   help="KAIROS_LEASE_TTL_MS values for the SIGKILL part, comma-separated (the drain part runs "
                        "on the first one's instances; empty: skip both)")
    p.add_argument("--outages", default="1,2.5,7", help="Redis outages in seconds (comma-separated; empty: skip)")
    p.add_argument("--outage-ttl-ms", type=int, default=5000, help="KAIROS_LEASE_TTL_MS during the outages")
    p.add_argument("--sessions", type=int, default=1000, help="live sessions on the drained instance (0: skip)")
    p.add_argument("--loops", type=int, default=48, help="client switch loops during the drain")
    p.add_argument("--drain-actors", type=int, default=100_000, help="actors of the drain at scale (0: skip)")
    p.add_argument("--drain-timeout-s", type=float, default=3.0, help="cut of the drain at scale")
    add_store_arguments(p)


def _numbers(text: str, kind: type) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise BenchError(f"not a comma-separated list of numbers: {text!r}") from e


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for bad values, before anything starts."""
    if args.reps < 1 or args.loops < 1 or args.sessions < 0 or args.drain_actors < 0:
        raise BenchError("--reps and --loops must be positive, --sessions and --drain-actors >= 0")
    if any(t < 100 for t in _numbers(str(args.ttl_ms), int)) or args.outage_ttl_ms < 100:
        raise BenchError("lease TTLs must be at least 100 ms")
    if any(o <= 0 for o in _numbers(args.outages, float)):
        raise BenchError("--outages must be positive")


def _with_logs(b: Bench, body: Callable[[], None]) -> None:
    try:
        body()
    except BaseException:
        for srv in b.servers:
            print(f"--- {srv.env['KAIROS_INSTANCE_ID']} ({srv.log_path}):\n{srv.log_tail(15)}", file=sys.stderr)
        raise


def _drains(args: argparse.Namespace, report: Report, b: Bench, ttl_ms: int) -> bool:
    """Drain reps on `b` (C drained while client loops switch through all three); targets met?"""
    drains, seen, failed, acked = [], [], [], []

    def reps() -> None:
        for rep in range(args.reps):
            d, s, f, n = asyncio.run(drain_rep(b, args.sessions, args.loops))
            b.restart(2)
            drains.append(d)
            seen.append(s)
            failed.append(f)
            acked.append(n)
            report.step(f"drain rep {rep + 1}: {d:.3f} s (client saw {s:.3f} s), failed {f} of {n + f}")

    _with_logs(b, reps)
    base = f"ttl{ttl_ms}"
    report.latency(base, [ttl_ms / 1000] * args.reps, f"lease TTL {ttl_ms / 1000:g} s (baseline)", unit="s")
    report.latency("drain", drains, f"drain of {args.sessions} sessions, server (< 5 s)", unit="s", baseline=base)
    report.latency("drain_client", seen, "drain as the client saw it", unit="s", baseline=base)
    report.value("failed_during_drain", sum(failed), "", "failed requests during drain (target 0)")
    report.value("acked_during_drain", sum(acked), "", "acknowledged switches during drain")
    hit = max(drains) < 5 and sum(failed) == 0
    report.note(f"drain of {args.sessions} sessions: worst {max(drains):.3f} s, {sum(failed)} failed requests "
                f"(targets < 5 s, 0): {'OK' if hit else 'MISS'}")
    return hit


def run(args: argparse.Namespace, report: Report) -> None:
    """Run the parts chosen by the options; record windows and lateness in seconds."""
    check_arguments(args)
    ok = True
    with ExitStack() as stack:
        _progress.append(report)
        stack.callback(_progress.remove, report)
        redis_url, database_url = stack.enter_context(stores(args.redis_url, args.database_url))
        report.redis_url, report.database_url = redis_url, database_url

        def cluster(url: str, ttl_ms: int, n: int) -> Bench:
            env = server_env(url, database_url, f"bench-failover:{os.getpid()}:{time.time_ns()}:",
                             KAIROS_LEASE_TTL_MS=str(ttl_ms), KAIROS_RATE_LIMIT_GENERAL="0",
                             KAIROS_RATE_LIMIT_SWITCH="0", KAIROS_DRAIN_TIMEOUT_S="30")
            b = Bench(env, n)
            report.step(f"starting {n} instances, lease TTL {ttl_ms / 1000:g} s")
            b.start()
            for s in b.servers:
                report.add_server(s.url)
            return b

        for first, ttl_ms in enumerate(_numbers(str(args.ttl_ms), int)):
            ttl_s = ttl_ms / 1000
            windows: list[float] = []
            lateness: list[float] = []
            with ExitStack() as running:
                b = cluster(redis_url, ttl_ms, 3)
                running.callback(b.stop)

                def kills(b: Bench = b, ttl_s: float = ttl_s, windows: list[float] = windows,
                          lateness: list[float] = lateness) -> None:
                    for rep in range(args.reps):
                        w, late = asyncio.run(kill_rep(b, ttl_s))
                        b.restart(0)
                        windows.append(w)
                        lateness.append(late)
                        report.step(f"TTL {ttl_s:g} s, rep {rep + 1}: unavailable {w:.3f} s, expiry late {late:.3f} s")

                _with_logs(b, kills)
                if first == 0 and args.sessions:
                    ok &= _drains(args, report, b, ttl_ms)
            name = f"ttl{ttl_ms}"
            report.latency(name, [ttl_s] * args.reps, f"lease TTL {ttl_s:g} s (baseline)", unit="s")
            report.latency(f"{name}_unavailable", windows, f"TTL {ttl_s:g} s: unavailable after SIGKILL",
                           unit="s", baseline=name)
            report.latency(f"{name}_expiry_late", lateness, f"TTL {ttl_s:g} s: expiry late after failover",
                           unit="s", baseline=name)
            hit = max(windows) <= ttl_s + 1
            ok &= hit
            report.note(f"TTL {ttl_s:g} s: worst unavailability {max(windows):.3f} s, target <= {ttl_s + 1:g} s: "
                        f"{'OK' if hit else 'MISS'}")

        outages = _numbers(args.outages, float)
        if outages:
            own = RedisServer(Path(tempfile.mkdtemp(prefix="kairos-bench-own-redis-"))).start()
            stack.callback(own.kill)
            ttl_s = args.outage_ttl_ms / 1000
            report.latency("outage_ttl", [ttl_s] * args.reps, f"lease TTL {ttl_s:g} s (baseline)", unit="s")
            for outage_s in outages:
                lates: list[float] = []
                with ExitStack() as running:
                    b = cluster(own.url, args.outage_ttl_ms, 2)
                    running.callback(b.stop)

                    def outs(b: Bench = b, outage_s: float = outage_s, lates: list[float] = lates) -> None:
                        for rep in range(args.reps):
                            lates.append(asyncio.run(outage_rep(b, own, outage_s)))
                            report.step(f"Redis down {outage_s:g} s, rep {rep + 1}: every expiry applied "
                                        f"{lates[-1]:.3f} s after Redis was back")
                            for srv in b.servers:
                                srv.wait_ready(60)

                    _with_logs(b, outs)
                report.latency(f"outage{outage_s:g}", lates,
                               f"Redis down {outage_s:g} s: expiries applied after", unit="s", baseline="outage_ttl")
                hit = max(lates) <= ttl_s + 1.5
                ok &= hit
                report.note(f"Redis down {outage_s:g} s at TTL {ttl_s:g} s: every missed expiry applied within "
                            f"{max(lates):.3f} s of Redis answering again, target <= {ttl_s + 1.5:g} s: "
                            f"{'OK' if hit else 'MISS'}")

        if args.drain_actors:
            ttl_ms = 5000
            report.step(f"drain at scale: {args.drain_actors} in-process actors")
            r = asyncio.run(scale_drain(redis_url, database_url, args.drain_actors, args.drain_timeout_s, ttl_ms))
            period = ttl_ms / 5 / 1000
            report.value("renewal_period", period, "s", "renewal period at TTL 5 s (baseline)")
            report.value("scale_lag_cpu", r["lag_cpu_s"], "s", f"worst loop stall (CPU), {args.drain_actors} actors",
                         baseline="renewal_period")
            report.value("scale_lag_wall", r["lag_s"], "s", "worst loop lag (wall clock)", baseline="renewal_period")
            report.value("scale_drain_returned", r["drain_s"], "s", f"drain returned (cut at {args.drain_timeout_s:g} s)")
            report.value("scale_left", r["left"], "", "actors not handed off by the cut")
            report.value("scale_stop", r["stop_s"], "s", "stop after the cut")
            hit = r["lag_cpu_s"] < period / 2 and r["kept_liveness"] == 1.0 and r["drain_s"] < args.drain_timeout_s + 0.5
            ok &= hit
            report.note(f"drain at scale: liveness {'kept' if r['kept_liveness'] else 'LOST'}, worst stall "
                        f"{r['lag_cpu_s'] / period:.2f} of a renewal period (target < 0.5): {'OK' if hit else 'MISS'}")
    report.note("all targets met" if ok else "some targets missed")
