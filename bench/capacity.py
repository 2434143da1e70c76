"""`python -m bench capacity`: how many live sessions one process holds, and what that costs.

Starts a real `kairos serve` per size (tests/servers.py; embedded Redis/PostgreSQL unless
--redis-url / --database-url are given). For each size in --sessions:

1. creates and starts that many sessions (long clocks: they stay live) over --conns keep-alive
   connections; reports server RSS before/after and per live session;
2. GET and switch latency (p50/p99) on a sample of the live sessions, one request at a time;
3. expiry lateness of --expiring short sessions (created and watched first, then started
   together with a 2.5-4 s bank each), quiet: a raw WebSocket per session receives TIME_EXPIRED;
   lateness = its server timestamp - the deadline (start time + bank); then the same under a
   steady load of --load-rps switches/s over the live sessions;
4. per phase: the server's event-loop lag (`kairos_event_loop_lag_seconds`), its GC pauses
   (`kairos_gc_pause_seconds`), CPU use, how often the kernel preempted it, and the load average.

Targets (issue 11): expiry lateness under load p99 <= 10 ms, max <= 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from bench._wsraw import RawWs, open_ws
from bench.client import RawHttp, session_body
from bench.fanout import _lag_probe, pct, rss_kb, serving_pids
from bench.report import BenchError, Report
from bench.servers import proc_status, process_cpu_s
from bench.target import Target, add_target_arguments, check_target_arguments, kairos

QUICK: dict[str, Any] = {"sessions": "200", "expiring": 10, "sample": 20, "load_rps": 50}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench capacity`."""
    p.add_argument("--sessions", default="10000,100000", help="comma-separated live-session counts")
    p.add_argument("--conns", type=int, default=16, help="connections creating the sessions")
    p.add_argument("--sample", type=int, default=300, help="sessions sampled for GET/switch latency")
    p.add_argument("--expiring", type=int, default=500, help="short sessions whose expiry is timed")
    p.add_argument("--load-rps", type=float, default=300, help="steady switch load during the second run")
    p.add_argument("--passivate-after-ms", type=int, default=0,
                   help="KAIROS_PASSIVATE_AFTER_MS of the server started here: 0 keeps every session's actor "
                        "in memory (the worst case for memory and GC; with the server's default of 60000 "
                        "the sessions created first are passivated before a large size is even complete)")
    add_target_arguments(p)


def check_arguments(args: argparse.Namespace) -> None:
    """Sizes must be positive; target options must agree."""
    check_target_arguments(args)
    try:
        sizes = [int(x) for x in str(args.sessions).split(",")]
    except ValueError as e:
        raise BenchError(f"--sessions must be comma-separated numbers, got {args.sessions!r}") from e
    if min(*sizes, args.conns, args.sample, args.expiring) < 1 or args.load_rps <= 0 or args.passivate_after_ms < 0:
        raise BenchError("--sessions, --conns, --sample, --expiring and --load-rps must be positive "
                         "(--passivate-after-ms at least 0)")


async def create_live(target: Target, n: int, conns: int, progress: Callable[[str], None] | None = None) -> list[str]:
    """`n` running sessions with a day on each clock, created over `conns` connections."""
    pool = [await RawHttp(target.url, target.token).open() for _ in range(conns)]
    sids: list[str] = []
    step = max(10_000, n // 10)

    async def worker(conn: RawHttp, count: int) -> None:
        for _ in range(count):
            body = session_body()
            status, data = await conn.request("POST", "/v1/sessions", json.dumps(body).encode())
            _check("create", status, data)
            status, data = await conn.request("POST", f"/v1/sessions/{body['session_id']}/start")
            _check("start", status, data)
            sids.append(body["session_id"])
            if progress is not None and len(sids) % step == 0:
                progress(f"{len(sids)} of {n} live")

    await asyncio.gather(*(worker(c, n // conns + (i < n % conns)) for i, c in enumerate(pool)))
    for c in pool:
        c.close()
    return sids


def _check(what: str, status: int, data: bytes) -> None:
    if status not in (200, 201):
        raise BenchError(f"{what} answered {status}: {data[:200].decode(errors='replace')}")


async def sample_latency(target: Target, sids: list[str], n: int) -> dict[str, list[float]]:
    """Sequential GET and switch on `n` random live sessions, in ms."""
    conn = await RawHttp(target.url, target.token).open()
    gets: list[float] = []
    switches: list[float] = []
    for sid in random.sample(sids, min(n, len(sids))):
        t0 = time.perf_counter()
        status, data = await conn.request("GET", f"/v1/sessions/{sid}")
        t1 = time.perf_counter()
        _check("GET", status, data)
        status, data = await conn.request("POST", f"/v1/sessions/{sid}/switch")
        t2 = time.perf_counter()
        _check("switch", status, data)
        gets.append((t1 - t0) * 1000)
        switches.append((t2 - t1) * 1000)
    conn.close()
    return {"get": gets, "switch": switches}


async def expiry_lateness(target: Target, n: int, conns: int = 8) -> tuple[list[float], list[float]]:
    """`n` sessions, each watched by a raw socket, started together with a 2.5-4 s bank (all
    are created and connected first, so the expiries fall in a window with no set-up traffic).
    Lateness in ms of every TIME_EXPIRED: applied (its server timestamp - the deadline) and
    delivered (its arrival here by the wall clock - the deadline: same machine, same clock)."""
    expired: dict[str, int] = {}
    arrived: dict[str, float] = {}
    done = asyncio.Event()

    def on_text(ws: RawWs, payload: bytes, now: int) -> None:
        frame = json.loads(payload)
        if frame.get("type") == "TIME_EXPIRED":
            expired[frame["sessionId"]] = frame["timestamp"]
            arrived[frame["sessionId"]] = time.time_ns() / 1e6
            if len(expired) >= n:
                done.set()

    pool = [await RawHttp(target.url, target.token).open() for _ in range(conns)]
    u = urlsplit(target.url)
    auth = f"&token={target.token}" if target.token else ""
    banks: dict[str, int] = {}
    sockets = []
    for i in range(n):
        bank = random.randint(2500, 4000)
        body = session_body(bank_ms=bank)
        status, data = await pool[i % conns].request("POST", "/v1/sessions", json.dumps(body).encode())
        _check("create", status, data)
        sid = body["session_id"]
        banks[sid] = bank
        sockets.append(await open_ws(u.hostname or "127.0.0.1", u.port or 80, f"/ws?sessionId={sid}{auth}", on_text))
    deadlines: dict[str, int] = {}

    async def start(conn: RawHttp, sids: list[str]) -> None:
        for sid in sids:
            status, data = await conn.request("POST", f"/v1/sessions/{sid}/start")
            _check("start", status, data)
            deadlines[sid] = json.loads(data)["data"]["server_time_ms"] + banks[sid]

    order = list(banks)
    await asyncio.gather(*(start(c, order[i::conns]) for i, c in enumerate(pool)))
    try:
        await asyncio.wait_for(done.wait(), 30)
    except TimeoutError:
        pass
    for c in pool:
        c.close()
    for ws in sockets:
        if ws.transport is not None:
            ws.transport.close()
    return ([float(expired[sid] - deadlines[sid]) for sid in expired],
            [arrived[sid] - deadlines[sid] for sid in expired])


async def switch_load(target: Target, sids: list[str], rps: float, stop: asyncio.Event, conns: int = 32) -> int:
    """Switch random live sessions at `rps` per second (spread over `conns` connections, enough
    to keep the rate with a switch taking ~100 ms on a busy machine) until `stop`; returns how
    many were sent."""
    pool = [await RawHttp(target.url, target.token).open() for _ in range(conns)]
    sent = 0

    async def worker(conn: RawHttp) -> None:
        nonlocal sent
        interval = conns / rps
        next_at = time.perf_counter()
        while not stop.is_set():
            await conn.request("POST", f"/v1/sessions/{random.choice(sids)}/switch")
            sent += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    await asyncio.gather(*(worker(c) for c in pool))
    for c in pool:
        c.close()
    return sent


_SCRAPED = ("kairos_event_loop_lag_seconds", "kairos_gc_pause_seconds")


async def server_state(target: Target) -> dict[str, float]:
    """The server's loop-lag and GC-pause histograms (`/metrics`), its CPU seconds and involuntary
    context switches (`/proc`: the kernel gave its core to another process), and the load average."""
    conn = await RawHttp(target.url, target.token).open()
    try:
        _, body = await conn.request("GET", "/metrics")
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(_SCRAPED):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    out["cpu_s"] = process_cpu_s(target.pid)
    # how often the kernel took the CPU away from the server while it could still run
    out["preempted"] = float(proc_status(target.pid, "nonvoluntary_ctxt_switches")) if target.pid else 0.0
    out["load"] = os.getloadavg()[0]
    out["t"] = time.monotonic()
    return out


def lag_between(a: dict[str, float], b: dict[str, float]) -> str:
    """Between two `server_state`s: share of 100 ms loop wake-ups later than 5/10/25 ms, GC
    pauses of the oldest generation, server CPU use, preemptions and the load average."""
    count = b.get("kairos_event_loop_lag_seconds_count", 0) - a.get("kairos_event_loop_lag_seconds_count", 0)
    if count <= 0:
        return "no samples"
    parts = []
    for le in ("0.005", "0.01", "0.025"):
        key = f'kairos_event_loop_lag_seconds_bucket{{le="{le}"}}'
        late = count - (b.get(key, 0) - a.get(key, 0))
        parts.append(f">{float(le) * 1000:.0f} ms {100 * late / count:.1f}%")
    mean = (b.get("kairos_event_loop_lag_seconds_sum", 0) - a.get("kairos_event_loop_lag_seconds_sum", 0)) / count
    out = f"loop lag mean {mean * 1000:.2f} ms, " + ", ".join(parts)
    for gen in ("0", "1", "2"):
        n = b.get(f'kairos_gc_pause_seconds_count{{generation="{gen}"}}', 0) - \
            a.get(f'kairos_gc_pause_seconds_count{{generation="{gen}"}}', 0)
        total = b.get(f'kairos_gc_pause_seconds_sum{{generation="{gen}"}}', 0) - \
            a.get(f'kairos_gc_pause_seconds_sum{{generation="{gen}"}}', 0)
        over = n - (b.get(f'kairos_gc_pause_seconds_bucket{{generation="{gen}",le="0.01"}}', 0)
                    - a.get(f'kairos_gc_pause_seconds_bucket{{generation="{gen}",le="0.01"}}', 0))
        if n:
            out += f"; gen{gen} GC {n:.0f}x mean {1000 * total / n:.2f} ms ({over:.0f} over 10 ms)"
    secs = max(1e-9, b["t"] - a["t"])
    out += (f"; server CPU {100 * (b['cpu_s'] - a['cpu_s']) / secs:.0f}%, preempted "
            f"{(b['preempted'] - a['preempted']) / secs:.0f}/s, load average {b['load']:.2f}")
    return out


async def audit_settled(target: Target, timeout_s: float = 180) -> float:
    """Wait until the audit has caught up with the outbox (`kairos_audit_lag_seconds` < 1 s): a
    backlog of set-up entries drained in big batches would load the measured phases. Seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        conn = await RawHttp(target.url, target.token).open()
        try:
            _, body = await conn.request("GET", "/metrics")
        finally:
            conn.close()
        lag = next((float(line.split()[1]) for line in body.decode(errors="replace").splitlines()
                    if line.startswith("kairos_audit_lag_seconds ")), 0.0)
        if lag < 1:
            break
        await asyncio.sleep(1)
    return time.monotonic() - t0


async def measure(target: Target, n: int, args: argparse.Namespace,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One size on a fresh server."""
    pids = serving_pids(target.pid) if target.pid else []
    rss0 = sum(rss_kb(p) for p in pids)
    t0 = time.perf_counter()
    sids = await create_live(target, n, args.conns, progress)
    create_s = time.perf_counter() - t0
    rss1 = sum(rss_kb(p) for p in pids)
    settle_s = await audit_settled(target)
    say = progress or (lambda _: None)
    say(f"GET and switch on {args.sample} sessions")
    lat = await sample_latency(target, sids, args.sample)
    say(f"expiry of {args.expiring} sessions, quiet")
    lag0 = await server_state(target)
    client_lag: list[float] = []  # this process's own loop lag: a late client delays "delivered"
    probe = asyncio.create_task(_lag_probe(client_lag))
    quiet, quiet_delivered = await expiry_lateness(target, args.expiring)
    quiet_client = client_lag[:]
    client_lag.clear()
    lag1 = await server_state(target)
    stop = asyncio.Event()
    load = asyncio.create_task(switch_load(target, sids, args.load_rps, stop))
    t1 = time.perf_counter()
    say(f"expiry of {args.expiring} sessions under {args.load_rps:g} switches/s")
    loaded, loaded_delivered = await expiry_lateness(target, args.expiring)
    probe.cancel()
    stop.set()
    sent = await load
    load_rate = sent / (time.perf_counter() - t1)
    lag2 = await server_state(target)
    return {"sessions": n, "create_s": create_s, "rss_before_mb": rss0 / 1024, "rss_after_mb": rss1 / 1024,
            "rss_kb_per_session": (rss1 - rss0) / max(1, n), "get": lat["get"], "switch": lat["switch"],
            "quiet": quiet, "quiet_lag": lag_between(lag0, lag1), "load_rps": load_rate, "loaded": loaded,
            "load_lag": lag_between(lag1, lag2), "expiring": args.expiring, "settle_s": settle_s,
            "quiet_delivered": quiet_delivered, "loaded_delivered": loaded_delivered,
            "client_lag": {"quiet": quiet_client, "loaded": client_lag}}


def record(report: Report, r: dict[str, Any]) -> None:
    """Put one size's figures on the report; the quiet expiry is the baseline of the loaded one."""
    n = r["sessions"]
    report.latency(f"{n}.get", r["get"], f"{n} live: GET session (sample)")
    report.latency(f"{n}.switch", r["switch"], f"{n} live: POST switch (sample)", baseline=f"{n}.get")
    report.latency(f"{n}.expiry_quiet", r["quiet"], f"{n} live: expiry lateness, quiet")
    report.latency(f"{n}.expiry_load", r["loaded"], f"{n} live: expiry lateness, {r['load_rps']:.0f} switches/s",
                   baseline=f"{n}.expiry_quiet")
    report.latency(f"{n}.expiry_quiet_delivered", r["quiet_delivered"], f"{n} live: expiry delivered, quiet")
    report.latency(f"{n}.expiry_load_delivered", r["loaded_delivered"],
                   f"{n} live: expiry delivered, {r['load_rps']:.0f} switches/s", baseline=f"{n}.expiry_quiet_delivered")
    report.value(f"{n}.rss_kb_per_session", r["rss_kb_per_session"], "KB", f"{n} live: server RSS per session")
    report.value(f"{n}.rss_mb", r["rss_after_mb"], "MB", f"{n} live: server RSS")
    report.value(f"{n}.create_s", r["create_s"], "s", f"{n} live: time to create and start them")
    report.value(f"{n}.audit_settle_s", r["settle_s"], "s", f"{n} live: wait for the audit to catch up")
    loaded = r["loaded"]
    ok = bool(loaded) and pct(loaded, 0.99) <= 10 and max(loaded) <= 25
    report.note(f"{n} live: {len(r['quiet'])}/{r['expiring']} quiet and {len(loaded)}/{r['expiring']} loaded "
                f"expiries seen; under load p99 {pct(loaded, 0.99):.0f} ms, max {max(loaded, default=float('nan')):.0f}"
                f" ms (target p99 <= 10, max <= 25: {'OK' if ok else 'MISS'})")
    for phase, lag in (("quiet", r["quiet_lag"]), ("loaded", r["load_lag"])):
        mine = r["client_lag"][phase]
        report.note(f"{n} live, {phase} phase: {lag}; this client's own loop lag p99 {pct(mine, 0.99):.1f} ms, "
                    f"max {max(mine, default=float('nan')):.1f} ms (it delays the delivered figure)")


def run(args: argparse.Namespace, report: Report) -> None:
    """A fresh server per size (or --url for one size)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for n in [int(x) for x in str(args.sessions).split(",")]:
        report.step(f"{n} live sessions")
        env = {"KAIROS_PASSIVATE_AFTER_MS": str(args.passivate_after_ms)} if not args.url else {}
        with kairos(args, report, **env) as target:
            r = asyncio.run(measure(target, n, args, report.step))
        record(report, r)
        if len(r["quiet"]) < r["expiring"] or len(r["loaded"]) < r["expiring"]:
            raise BenchError(f"{n} live: an expiry was never seen (quiet {len(r['quiet'])}, "
                             f"loaded {len(r['loaded'])} of {r['expiring']})")
