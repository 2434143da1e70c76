"""The same switch workload against two or more SyncKairos-compatible servers, interleaved.

Targets are the --url servers in order (A, B, C, D); with fewer than two, Kairos servers started
here fill up to B (--workers-X sets their process count). Each phase runs in --rounds rounds, the
targets taking turns A, B, B, A, A, B … so all see the same machine load:

1. sequential switch, GET session and GET /health (the baseline) on one keep-alive connection,
   plus a raw Redis PING where Redis is known (servers started here, or --redis-url);
2. concurrent switches at a fixed connection count: switches/s, latency, and the server's CPU per
   switch from /proc (servers started here, or --pid-X);
3. WebSocket fan-out: --subscribers sockets watch one session; each REST switch's delivery to
   every subscriber, next to the switch's own HTTP answer (the baseline).

Only the SyncKairos v2 subset is used (create, start, switch, GET, /health, STATE_UPDATE frames):
no WebSocket commands, no auth needed (--no-auth-X), no Kairos-only fields. The ratios of each
target to A are printed at the end. Rate limits must be off on every target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import string
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

from bench.client import RawHttp, check_errors, start_session
from bench.report import BenchError, Report
from bench.servers import stores
from bench.switch import concurrent, sequential, start_sessions
from bench.target import Target, add_store_arguments, check_url, kairos

LABELS = string.ascii_uppercase[:4]
QUICK: dict[str, Any] = {"rounds": 2, "n": 200, "seconds": 1.0, "subscribers": 20, "switches": 20}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench compare` (per-target ones for A to D)."""
    p.add_argument("--url", action="append", default=[], help="a target, repeatable: A, B, C, D in order")
    p.add_argument("--token", default=None, help="bearer token for every --url target without --token-X")
    p.add_argument("--no-auth", action="store_true", help="send no token to any --url target")
    p.add_argument("--rounds", type=int, default=10, help="rounds per phase (targets take turns A B B A …)")
    p.add_argument("-n", type=int, default=2000, help="sequential switches per target, over all rounds")
    p.add_argument("--sessions", type=int, default=20,
                   help="sessions the sequential switches rotate over (keeps per-session limits out of it)")
    p.add_argument("--seconds", type=float, default=6.0, help="concurrent phase per target, over all rounds")
    p.add_argument("--connections", type=int, default=16, help="connections in the concurrent phase")
    p.add_argument("--concurrent-sessions", type=int, default=64, help="sessions in the concurrent phase")
    p.add_argument("--subscribers", type=int, default=50, help="WebSocket subscribers of the fan-out session")
    p.add_argument("--switches", type=int, default=200, help="fan-out switches per target, over all rounds")
    p.add_argument("--no-ws", action="store_true", help="skip the fan-out phase (servers without WebSocket)")
    for x in LABELS:
        g = p.add_argument_group(f"target {x}")
        g.add_argument(f"--token-{x}", default=None, help=f"bearer token for {x}")
        g.add_argument(f"--no-auth-{x}", action="store_true", help=f"send no token to {x}")
        g.add_argument(f"--pid-{x}", type=int, default=None, help=f"process id of {x}, for CPU per switch")
        if x in "AB":
            g.add_argument(f"--workers-{x}", type=int, default=1,
                           help=f"`kairos serve --workers` when {x} is started here (no --url for it)")
    add_store_arguments(p)


def check_arguments(args: argparse.Namespace) -> None:
    """URLs, sizes and per-target options must make sense before anything starts."""
    if len(args.url) > len(LABELS):
        raise BenchError(f"at most {len(LABELS)} --url targets")
    for i, url in enumerate(args.url):
        check_url(url)
        x = LABELS[i]
        if not (getattr(args, f"token_{x}") or args.token or args.no_auth or getattr(args, f"no_auth_{x}")):
            raise BenchError(f"target {x} ({url}) needs --token-{x}/--token, or --no-auth-{x}/--no-auth")
    for x in LABELS[max(2, len(args.url)):]:
        if getattr(args, f"token_{x}") or getattr(args, f"no_auth_{x}") or getattr(args, f"pid_{x}"):
            raise BenchError(f"options for target {x} given, but there is no --url for it")
    sizes = (args.rounds, args.n, args.sessions, args.connections, args.concurrent_sessions,
             args.subscribers, args.switches)
    if min(sizes) < 1 or args.seconds <= 0:
        raise BenchError("sizes (--rounds, -n, --sessions, --seconds, --connections, "
                         "--concurrent-sessions, --subscribers, --switches) must be positive")
    if min(args.workers_A, args.workers_B) < 1:
        raise BenchError("--workers-A/--workers-B must be at least 1")


def _targets(args: argparse.Namespace, report: Report, stack: ExitStack) -> list[Target]:
    """Open every target: the --url ones as given, Kairos servers started here for the rest."""
    count = max(2, len(args.url))
    own = count - len(args.url)
    own_args = argparse.Namespace(**vars(args))
    if own:  # the servers started here share one Redis and one PostgreSQL (each its own key prefix)
        own_args.redis_url, own_args.database_url = stack.enter_context(stores(args.redis_url, args.database_url))
    targets = []
    for i in range(count):
        x = LABELS[i]
        if i < len(args.url):
            no_auth = args.no_auth or getattr(args, f"no_auth_{x}")
            token = None if no_auth else (getattr(args, f"token_{x}") or args.token)
            targets.append(stack.enter_context(kairos(args, report, label=x, url=args.url[i], token=token or "",
                                                      pid=getattr(args, f"pid_{x}"))))
        else:
            own_args.url = None
            targets.append(stack.enter_context(kairos(own_args, report, label=x,
                                                      workers=getattr(args, f"workers_{x}"))))
    return targets


def _turns(targets: list[Target], rounds: int) -> Iterator[tuple[int, Target]]:
    """(round, target) in the order A B | B A | A B …"""
    for r in range(rounds):
        for t in (targets if r % 2 == 0 else targets[::-1]):
            yield r, t


async def _reachable(target: Target) -> None:
    try:
        conn = await asyncio.wait_for(RawHttp(target.url, target.token).open(), 5)
        status, _ = await asyncio.wait_for(conn.request("GET", "/health"), 5)
        conn.close()
    except (OSError, TimeoutError) as e:
        raise BenchError(f"target {target.label} ({target.url}) is not reachable: {e}") from e
    if status != 200:
        raise BenchError(f"target {target.label} ({target.url}): GET /health answered {status}")


async def fanout(target: Target, subscribers: int, switches: int) -> dict[str, Any]:
    """`switches` REST switches of one session watched by `subscribers` sockets: per switch, the
    HTTP answer time, every delivery (send -> STATE_UPDATE at a socket) and the last delivery."""
    from websockets.asyncio.client import connect

    conn = await RawHttp(target.url, target.token).open()
    try:
        sid = await start_session(conn)
        arrivals: list[list[float]] = [[] for _ in range(subscribers)]
        reached: Counter[int] = Counter()  # update index -> sockets that have it
        complete: dict[int, asyncio.Event] = {k: asyncio.Event() for k in range(switches)}

        async def watch(i: int, ws: Any) -> None:
            async for raw in ws:
                if json.loads(raw).get("type") != "STATE_UPDATE":
                    continue
                k = len(arrivals[i])
                arrivals[i].append(time.perf_counter())
                reached[k] += 1
                if reached[k] == subscribers and k in complete:
                    complete[k].set()

        async def open_one() -> Any:
            return await connect(target.ws_url(sid), compression=None, open_timeout=10)

        async with asyncio.TaskGroup() as tg:
            pending = [tg.create_task(open_one()) for _ in range(subscribers)]
        opened = [p.result() for p in pending]
        watchers: list[asyncio.Future[None]] = []
        acks: list[float] = []
        deliveries: list[float] = []
        last: list[float] = []
        missed = 0
        errors: Counter[int] = Counter()
        try:
            for ws in opened:
                first = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if first.get("type") != "CONNECTED":
                    raise BenchError(f"target {target.label} WebSocket: expected CONNECTED, got {first}")
            watchers = [asyncio.ensure_future(watch(i, ws)) for i, ws in enumerate(opened)]
            for k in range(switches):
                t0 = time.perf_counter()
                status, ms = await conn.timed("POST", f"/v1/sessions/{sid}/switch")
                if status != 200:
                    errors[status] += 1
                    continue
                acks.append(ms)
                try:
                    await asyncio.wait_for(complete[k].wait(), 10)
                except TimeoutError:
                    missed += subscribers - reached[k]
                    break  # counts no longer line up with switches: stop this round here
                at = [a[k] for a in arrivals]
                deliveries += [(t - t0) * 1000 for t in at]
                last.append((max(at) - t0) * 1000)
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
        check_errors(f"{target.label} fan-out", errors, switches)
        return {"ack": acks, "delivery": deliveries, "last": last, "missed": missed}
    finally:
        conn.close()


def run(args: argparse.Namespace, report: Report) -> None:
    """Run the three phases over the targets, round by round, and print the ratios to A."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with ExitStack() as stack:
        targets = _targets(args, report, stack)
        for t in targets:
            asyncio.run(_reachable(t))
        names = ", ".join(f"{t.label} = {t.url} ({report.servers.get(t.url) or 'unknown'})" for t in targets)
        report.note(f"targets: {names}")
        seq: dict[str, dict[str, list[float]]] = {t.label: {} for t in targets}
        conc: dict[str, dict[str, Any]] = {t.label: {"lat": [], "elapsed": 0.0, "cpu": 0.0} for t in targets}
        fan: dict[str, dict[str, Any]] = {t.label: {"ack": [], "delivery": [], "last": [], "missed": 0}
                                          for t in targets}
        per_round = max(1, args.n // args.rounds)
        for r, t in _turns(targets, args.rounds):
            report.step(f"sequential round {r + 1}/{args.rounds}: {t.label}")
            got = asyncio.run(sequential(t, per_round, min(args.sessions, per_round), warmup=20))
            for k, v in got.items():
                seq[t.label].setdefault(k, []).extend(v)
        sids = {t.label: asyncio.run(start_sessions(t, args.concurrent_sessions)) for t in targets}
        for r, t in _turns(targets, args.rounds):
            report.step(f"concurrent round {r + 1}/{args.rounds}: {t.label}")
            lat, elapsed, cpu = asyncio.run(concurrent(t, sids[t.label], args.connections,
                                                       args.seconds / args.rounds, 10**9))
            c = conc[t.label]
            c["lat"] += lat
            c["elapsed"] += elapsed
            c["cpu"] += cpu
        if not args.no_ws:
            per_fan = max(1, args.switches // args.rounds)
            for r, t in _turns(targets, args.rounds):
                report.step(f"fan-out round {r + 1}/{args.rounds}: {t.label}, {args.subscribers} subscribers")
                got = asyncio.run(fanout(t, args.subscribers, per_fan))
                for k in ("ack", "delivery", "last"):
                    fan[t.label][k] += got[k]
                fan[t.label]["missed"] += got["missed"]
        for t in targets:
            _record(report, t, seq[t.label], conc[t.label], fan[t.label], args)
        _ratios(report, targets, args)


def _record(report: Report, t: Target, seq: dict[str, list[float]], conc: dict[str, Any],
            fan: dict[str, Any], args: argparse.Namespace) -> None:
    x = t.label
    report.latency(f"{x}.health", seq["health"], f"{x}: GET /health (baseline)")
    if seq.get("redis_ping"):
        report.latency(f"{x}.redis_ping", seq["redis_ping"], f"{x}: raw Redis PING", baseline=f"{x}.health")
    report.latency(f"{x}.switch", seq["switch"], f"{x}: POST switch, sequential", baseline=f"{x}.health")
    report.latency(f"{x}.get", seq["get"], f"{x}: GET session, sequential", baseline=f"{x}.health")
    report.latency(f"{x}.switch_concurrent", conc["lat"], f"{x}: POST switch, {args.connections} connections",
                   baseline=f"{x}.health")
    report.value(f"{x}.switches_per_s", len(conc["lat"]) / conc["elapsed"] if conc["elapsed"] else 0.0,
                 "/s", f"{x}: switches/s, {args.connections} connections")
    if t.pid is not None and conc["lat"]:
        report.value(f"{x}.cpu_ms_per_switch", conc["cpu"] * 1000 / len(conc["lat"]), "ms",
                     f"{x}: server CPU per switch")
    if fan["ack"]:
        report.latency(f"{x}.fanout_ack", fan["ack"], f"{x}: fan-out switch answer (baseline)")
        report.latency(f"{x}.fanout_delivery", fan["delivery"],
                       f"{x}: delivery to each of {args.subscribers}", baseline=f"{x}.fanout_ack")
        report.latency(f"{x}.fanout_last", fan["last"], f"{x}: delivery to all {args.subscribers}",
                       baseline=f"{x}.fanout_ack")
        report.value(f"{x}.fanout_missed", fan["missed"], "", f"{x}: fan-out deliveries missed")


def _ratios(report: Report, targets: list[Target], args: argparse.Namespace) -> None:
    """Each target's metrics over A's (lower is better for times, higher for switches/s)."""
    a = targets[0].label
    metrics: list[tuple[str, str, str]] = [
        ("switch", "p50", "sequential switch p50"), ("switch", "p99", "sequential switch p99"),
        ("get", "p50", "GET session p50"), ("health", "p50", "GET /health p50"),
        ("switch_concurrent", "p50", "concurrent switch p50"),
        ("fanout_delivery", "p50", "fan-out delivery p50"), ("fanout_delivery", "p99", "fan-out delivery p99"),
        ("fanout_last", "p99", "fan-out to all p99"),
    ]
    for t in targets[1:]:
        x = t.label
        for name, key, label in metrics:
            mine, theirs = report.latencies.get(f"{x}.{name}"), report.latencies.get(f"{a}.{name}")
            if mine is not None and theirs is not None and getattr(theirs.summary, key):
                report.value(f"{x}/{a}.{name}_{key}", getattr(mine.summary, key) / getattr(theirs.summary, key),
                             "x", f"{x}/{a}: {label}")
        # the switch's own cost relative to the same server's /health, compared across servers
        r_mine, r_theirs = report.latency_ratio(f"{x}.switch"), report.latency_ratio(f"{a}.switch")
        if r_mine and r_theirs:
            report.value(f"{x}/{a}.switch_over_health", r_mine / r_theirs, "x",
                         f"{x}/{a}: (switch / health) p50")
        for name, label in (("switches_per_s", "switches/s"), ("cpu_ms_per_switch", "CPU per switch")):
            mine_v, theirs_v = report.values.get(f"{x}.{name}"), report.values.get(f"{a}.{name}")
            if mine_v is not None and theirs_v is not None and theirs_v.value:
                report.value(f"{x}/{a}.{name}", mine_v.value / theirs_v.value, "x", f"{x}/{a}: {label}")
