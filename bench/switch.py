"""Switch latency and throughput of one server (a Kairos started here, or --url).

1. sequential, one keep-alive connection, each round: POST switch, GET the session, GET /health
   (the baseline: the same client and connection, no store behind it) and, where Redis is known,
   a raw Redis PING (the store's own round trip);
2. concurrent: --connections connections switching --sessions sessions for --seconds (at most
   --max-requests): switches/s, latency, and the server's CPU per switch (/proc; own server or --pid);
3. WebSocket SWITCH -> ACK round trip, next to PING -> PONG on the same socket (Kairos' WebSocket
   commands; --no-ws skips it for servers without them);
4. WebSocket SWITCH under concurrency: --connections sockets, each switching its own session
   (one command in flight per socket, so each also gets its session's STATE_UPDATE) for
   --seconds: commands/s, latency, and the server's CPU per command next to the REST figure.

Targets (issue 11), server CPU per command: REST switch <= 0.40 ms, WebSocket SWITCH <= 0.20 ms.

With --masters 1,2,3: one Kairos on each Redis size started here (1 master: a standalone server;
more: a Redis Cluster), phases 1 and 2 on each, the concurrent phase taking turns over --rounds:
switches/s in total and per master, and the ratio to the first size.

Rate limits of a server started here are off; a --url server should run without them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit

from bench._wsraw import RawWs, open_ws
from bench.client import RawHttp, RawRedis, check_errors, start_session
from bench.report import BenchError, Report
from bench.servers import process_cpu_s, stores
from bench.target import (
    Target,
    add_masters_argument,
    add_target_arguments,
    check_target_arguments,
    kairos,
    masters_sizes,
)

QUICK: dict[str, Any] = {"n": 200, "seconds": 1.0}
TARGET_CPU_MS = {"rest": 0.40, "ws": 0.20}  # server CPU per switch command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench switch`."""
    p.add_argument("-n", type=int, default=3000, help="sequential rounds (and WebSocket round trips)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of the concurrent phase")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap on concurrent-phase requests")
    p.add_argument("--sessions", type=int, default=64, help="sessions switched in the concurrent phase")
    p.add_argument("--connections", type=int, default=16, help="connections in the concurrent phase")
    p.add_argument("--no-ws", action="store_true", help="skip the WebSocket phase")
    add_target_arguments(p)
    add_masters_argument(p)


def check_arguments(args: argparse.Namespace) -> None:
    """Sizes must be positive; target options must agree."""
    check_target_arguments(args)
    masters_sizes(args)
    if min(args.n, args.sessions, args.connections, args.max_requests) < 1 or args.seconds <= 0:
        raise BenchError("-n, --seconds, --max-requests, --sessions and --connections must be positive")


async def sequential(target: Target, n: int, sessions: int = 1, warmup: int = 100) -> dict[str, list[float]]:
    """`n` rounds of switch, GET session, GET /health and raw Redis PING (if known), interleaved
    so all see the same load; switches rotate over `sessions` sessions. Milliseconds."""
    conn = await RawHttp(target.url, target.token).open()
    redis = await RawRedis(target.redis_url).open() if target.redis_url else None
    try:
        sids = [await start_session(conn) for _ in range(sessions)]
        out: dict[str, list[float]] = {"switch": [], "get": [], "health": [], "redis_ping": []}
        errors: Counter[int] = Counter()
        for i in range(warmup + n):
            sid = sids[i % len(sids)]
            st, sw = await conn.timed("POST", f"/v1/sessions/{sid}/switch")
            sg, get = await conn.timed("GET", f"/v1/sessions/{sid}")
            sh, health = await conn.timed("GET", "/health")
            ping = await redis.ping_ms() if redis is not None else None
            for s in (st, sg, sh):
                if s != 200:
                    errors[s] += 1
            if i >= warmup:
                out["switch"].append(sw)
                out["get"].append(get)
                out["health"].append(health)
                if ping is not None:
                    out["redis_ping"].append(ping)
        check_errors(f"{target.label} sequential", errors, 3 * (warmup + n))
        return out
    finally:
        conn.close()
        if redis is not None:
            redis.close()


async def start_sessions(target: Target, n: int) -> list[str]:
    """`n` running sessions, created over one connection."""
    setup = await RawHttp(target.url, target.token).open()
    try:
        return [await start_session(setup) for _ in range(n)]
    finally:
        setup.close()


async def concurrent(target: Target, sids: list[str], connections: int, seconds: float,
                     max_requests: int) -> tuple[list[float], float, float]:
    """(switch latencies ms, elapsed s, server CPU s) with `connections` connections switching
    the sessions `sids` for `seconds` or `max_requests` requests, whichever ends first."""
    pool = [await RawHttp(target.url, target.token).open() for _ in range(connections)]
    lat: list[float] = []
    errors: Counter[int] = Counter()
    stop_at = time.perf_counter() + seconds

    async def worker(i: int, conn: RawHttp) -> None:
        k = i
        while time.perf_counter() < stop_at and len(lat) + sum(errors.values()) < max_requests:
            status, ms = await conn.timed("POST", f"/v1/sessions/{sids[k % len(sids)]}/switch")
            k += connections
            if status == 200:
                lat.append(ms)
            else:
                errors[status] += 1

    cpu0 = process_cpu_s(target.pid)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(pool)))
    finally:
        for c in pool:
            c.close()
    elapsed = time.perf_counter() - t0
    check_errors(f"{target.label} concurrent", errors, len(lat) + sum(errors.values()))
    return lat, elapsed, process_cpu_s(target.pid) - cpu0


async def websocket(target: Target, n: int, warmup: int = 100) -> dict[str, list[float]]:
    """`n` rounds of WebSocket SWITCH -> ACK and PING -> PONG on one socket (milliseconds)."""
    from websockets.asyncio.client import connect

    conn = await RawHttp(target.url, target.token).open()
    try:
        sid = await start_session(conn)
    finally:
        conn.close()
    out: dict[str, list[float]] = {"ws_switch": [], "ws_ping": []}
    async with connect(target.ws_url(sid), compression=None, open_timeout=10) as ws:
        first = json.loads(await ws.recv())
        if first.get("type") != "CONNECTED":
            raise BenchError(f"{target.label} WebSocket: expected CONNECTED, got {first}")

        async def answer(frame: dict[str, Any], wanted: str, rid: str | None) -> float:
            t0 = time.perf_counter()
            await ws.send(json.dumps(frame))
            while True:
                got = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if got.get("type") in wanted.split("|") and (rid is None or got.get("request_id") == rid):
                    if got["type"] == "ERROR":
                        raise BenchError(f"{target.label} WebSocket SWITCH answered {got}")
                    return (time.perf_counter() - t0) * 1000

        for i in range(warmup + n):
            sw = await answer({"type": "SWITCH", "request_id": f"r{i}"}, "ACK|ERROR", f"r{i}")
            ping = await answer({"type": "PING", "client_time": int(time.time() * 1000)}, "PONG", None)
            if i >= warmup:
                out["ws_switch"].append(sw)
                out["ws_ping"].append(ping)
    return out


async def ws_concurrent(target: Target, sids: list[str], seconds: float,
                        max_requests: int) -> tuple[list[float], float, float]:
    """(SWITCH -> ACK latencies ms, elapsed s, server CPU s): one raw socket per session in `sids`,
    each sending SWITCH (a fresh request_id, as clients do) and waiting for its ACK, for `seconds`
    or `max_requests` commands, whichever ends first."""
    u = urlsplit(target.url)
    auth = f"&token={target.token}" if target.token else ""
    waiting: dict[RawWs, asyncio.Future[bytes]] = {}
    connected: set[RawWs] = set()
    all_connected = asyncio.Event()

    def on_text(ws: RawWs, payload: bytes, now: int) -> None:
        head = payload[:24]  # the type comes first; skip the session's own STATE_UPDATE
        if b'"CONNECTED"' in head:
            connected.add(ws)
            if len(connected) == len(sids):
                all_connected.set()
        elif b'"ACK"' in head or b'"ERROR"' in head:
            fut = waiting.pop(ws, None)
            if fut is not None and not fut.done():
                fut.set_result(payload)

    socks = [await open_ws(u.hostname or "127.0.0.1", u.port or 80, f"/ws?sessionId={sid}{auth}", on_text)
             for sid in sids]
    lat: list[float] = []
    errors: Counter[str] = Counter()
    stop_at = time.perf_counter() + seconds
    loop = asyncio.get_running_loop()

    async def worker(i: int, ws: RawWs) -> None:
        n = 0
        while time.perf_counter() < stop_at and len(lat) + sum(errors.values()) < max_requests:
            fut = waiting[ws] = loop.create_future()
            t0 = time.perf_counter()
            ws.send_text(f'{{"type":"SWITCH","request_id":"c{i}-{n}"}}')
            payload = await asyncio.wait_for(fut, 10)
            n += 1
            if b'"ACK"' in payload[:24]:
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                errors[str(json.loads(payload).get("code"))] += 1

    await asyncio.wait_for(all_connected.wait(), 10)  # every socket CONNECTED before measuring
    cpu0 = process_cpu_s(target.pid)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i, ws) for i, ws in enumerate(socks)))
    finally:
        for ws in socks:
            if ws.transport is not None:
                ws.transport.close()
    elapsed = time.perf_counter() - t0
    cpu = process_cpu_s(target.pid) - cpu0
    done = len(lat) + sum(errors.values())
    if sum(errors.values()) > 0.01 * max(1, done):
        raise BenchError(f"{target.label} WebSocket concurrent: {sum(errors.values())} of {done} SWITCH "
                         f"commands refused ({dict(errors)}); is the switch rate limit off?")
    return lat, elapsed, cpu


def record_sequential(report: Report, seq: dict[str, list[float]], prefix: str = "", tag: str = "") -> None:
    """Put a `sequential` result on the report: health and Redis PING as baselines."""
    report.latency(f"{prefix}health", seq["health"], f"{tag}GET /health (baseline)")
    if seq["redis_ping"]:
        report.latency(f"{prefix}redis_ping", seq["redis_ping"], f"{tag}raw Redis PING",
                       baseline=f"{prefix}health")
    report.latency(f"{prefix}switch", seq["switch"], f"{tag}POST switch, sequential",
                   baseline=f"{prefix}health")
    report.latency(f"{prefix}get", seq["get"], f"{tag}GET session, sequential", baseline=f"{prefix}health")
    if seq["redis_ping"]:
        report.latency(f"{prefix}switch_vs_redis", seq["switch"], f"{tag}POST switch vs Redis PING",
                       baseline=f"{prefix}redis_ping")


def run(args: argparse.Namespace, report: Report) -> None:
    """Measure the three phases against the target."""
    try:
        import uvloop

        uvloop.install()  # the client's own overhead counts in every sample: keep it small
    except ImportError:
        pass
    if masters_sizes(args):
        _run_masters(args, report)
        return
    with kairos(args, report) as target:
        report.step(f"sequential: {args.n} rounds of switch / GET / health / Redis PING")
        record_sequential(report, asyncio.run(sequential(target, args.n)))
        report.step(f"concurrent: {args.sessions} sessions x {args.connections} connections, "
                    f"{args.seconds:g} s")
        sids = asyncio.run(start_sessions(target, args.sessions))
        lat, elapsed, cpu = asyncio.run(concurrent(target, sids, args.connections, args.seconds,
                                                   args.max_requests))
        report.latency("switch_concurrent", lat, f"POST switch, {args.connections} connections",
                       baseline="health")
        report.value("switches_per_s", len(lat) / elapsed, "/s", f"switches/s, {args.connections} connections")
        if target.pid is not None and lat:
            report.value("server_cpu_ms_per_switch", cpu * 1000 / len(lat), "ms",
                         "server CPU per switch (all its work)")
        if not args.no_ws:
            report.step(f"WebSocket: {args.n} SWITCH -> ACK and PING -> PONG")
            ws = asyncio.run(websocket(target, args.n))
            report.latency("ws_ping", ws["ws_ping"], "WebSocket PING -> PONG (baseline)")
            report.latency("ws_switch", ws["ws_switch"], "WebSocket SWITCH -> ACK", baseline="ws_ping")
            conns = min(args.connections, args.sessions)
            report.step(f"WebSocket concurrent: {conns} sockets, one session each, {args.seconds:g} s")
            lat, elapsed, cpu = asyncio.run(ws_concurrent(target, sids[:conns], args.seconds,
                                                          args.max_requests))
            report.latency("ws_switch_concurrent", lat, f"WebSocket SWITCH -> ACK, {conns} sockets",
                           baseline="ws_ping")
            report.value("ws_switches_per_s", len(lat) / elapsed, "/s", f"WebSocket SWITCH/s, {conns} sockets")
            if target.pid is not None and lat:
                report.value("server_cpu_ms_per_ws_switch", cpu * 1000 / len(lat), "ms",
                             "server CPU per WebSocket SWITCH (with its STATE_UPDATE)")
    _targets(report)


def _run_masters(args: argparse.Namespace, report: Report) -> None:
    """Phases 1 and 2 against one Kairos per Redis size of --masters (all up at once, so the
    concurrent phase can take turns: every size sees the same machine load)."""
    from bench.redis_topology import masters_by_size

    sizes = masters_sizes(args)
    with ExitStack() as stack:
        urls = masters_by_size(stack, sizes, report.step)
        _, database_url = stack.enter_context(stores(urls[sizes[0]], args.database_url))
        targets = {n: stack.enter_context(kairos(args, report, label=f"{n}m", redis_url=urls[n],
                                                 database_url=database_url)) for n in sizes}
        base = f"{sizes[0]}m"
        for n, target in targets.items():
            report.step(f"{n}m sequential: {args.n} rounds of switch / GET / health / Redis PING")
            record_sequential(report, asyncio.run(sequential(target, args.n)), f"{n}m_", f"{n}m ")
        sids = {n: asyncio.run(start_sessions(t, args.sessions)) for n, t in targets.items()}
        lat: dict[int, list[float]] = {n: [] for n in sizes}
        took = dict.fromkeys(sizes, 0.0)
        cpu = dict.fromkeys(sizes, 0.0)
        for r in range(args.rounds):
            for n, target in targets.items():
                report.step(f"concurrent, round {r + 1}/{args.rounds}, {n}m: {args.sessions} sessions x "
                            f"{args.connections} connections, {args.seconds / args.rounds:g} s")
                got, elapsed, used = asyncio.run(concurrent(target, sids[n], args.connections,
                                                            args.seconds / args.rounds, args.max_requests))
                lat[n] += got
                took[n] += elapsed
                cpu[n] += used
        for n in sizes:
            report.latency(f"{n}m_switch_concurrent", lat[n], f"{n}m POST switch, {args.connections} connections",
                           baseline=f"{n}m_health")
        report.per_master("switches_per_s", "switches/s", {n: len(lat[n]) / took[n] for n in sizes}, base)
        for n in sizes:
            if lat[n]:
                report.value(f"{n}m_server_cpu_ms_per_switch", cpu[n] * 1000 / len(lat[n]), "ms",
                             f"server CPU per switch, {n} master(s)", baseline=f"{base}_server_cpu_ms_per_switch")


def _targets(report: Report) -> None:
    """The service's latency targets, checked as ratios to this run's baselines where possible."""
    checks = [("switch p50 / health p50", report.latency_ratio("switch"), 1.5),
              ("switch p99 / switch p50", report.latencies["switch"].summary.p99
               / report.latencies["switch"].summary.p50, 4.0)]
    if "ws_switch" in report.latencies:
        checks.append(("WebSocket SWITCH p50 (ms)", report.latencies["ws_switch"].summary.p50, 1.0))
    for label, value, limit in checks:
        if value is not None:
            report.note(f"{label} = {value:.2f} (target <= {limit:g}) {'OK' if value <= limit else 'MISS'}")
    for kind, key in (("rest", "server_cpu_ms_per_switch"), ("ws", "server_cpu_ms_per_ws_switch")):
        if key in report.values:
            cpu, limit = report.values[key].value, TARGET_CPU_MS[kind]
            report.note(f"server CPU per {'REST' if kind == 'rest' else 'WebSocket'} switch = {cpu:.3f} ms "
                        f"(target <= {limit:g}) {'OK' if cpu <= limit else 'MISS'}; "
                        f"load average {os.getloadavg()[0]:.2f}")
    rps = report.values["switches_per_s"].value
    report.note(f"switches/s = {rps:.0f} (target >= 1000) {'OK' if rps >= 1000 else 'MISS'}")
