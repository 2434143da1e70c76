"""`python -m bench capacity`: how many live sessions one process holds, and what that costs.

Starts a real `kairos serve` per size (tests/servers.py; embedded Redis/PostgreSQL unless
--redis-url / --database-url are given). For each size in --sessions:

1. creates and starts that many sessions (long clocks: they stay live) over --conns keep-alive
   connections; reports server RSS before/after and per live session;
2. GET and switch latency (p50/p99) on a sample of the live sessions, one request at a time;
3. expiry lateness of --expiring short sessions (a 1.5-3 s bank each), quiet: a raw WebSocket per
   session receives TIME_EXPIRED; lateness = its server timestamp - the deadline (start time +
   bank); then the same under a steady load of --load-rps switches/s over the live sessions;
4. the server's event-loop lag (`kairos_event_loop_lag_seconds`) in each phase.

Targets (issue 11): expiry lateness under load p99 <= 10 ms, max <= 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._wsraw import RawWs, open_ws  # noqa: E402
from bench.fanout import pct, rss_kb, serving_pids  # noqa: E402
from bench.switch import RawHttp, session_body  # noqa: E402


async def create_live(host: str, port: int, token: str, n: int, conns: int) -> list[str]:
    """`n` running sessions with a day on each clock, created over `conns` connections."""
    pool = [await RawHttp(host, port, token).open() for _ in range(conns)]
    sids: list[str] = []

    async def worker(conn: RawHttp, count: int) -> None:
        for _ in range(count):
            body = session_body()
            status, data = await conn.request("POST", "/v1/sessions", json.dumps(body).encode())
            assert status == 201, data
            status, data = await conn.request("POST", f"/v1/sessions/{body['session_id']}/start")
            assert status == 200, data
            sids.append(body["session_id"])

    await asyncio.gather(*(worker(c, n // conns + (i < n % conns)) for i, c in enumerate(pool)))
    for c in pool:
        c.close()
    return sids


async def sample_latency(host: str, port: int, token: str, sids: list[str], n: int) -> dict[str, float]:
    """Sequential GET and switch on `n` random live sessions: p50/p99 in ms."""
    conn = await RawHttp(host, port, token).open()
    gets: list[float] = []
    switches: list[float] = []
    for sid in random.sample(sids, min(n, len(sids))):
        t0 = time.perf_counter()
        status, _ = await conn.request("GET", f"/v1/sessions/{sid}")
        t1 = time.perf_counter()
        assert status == 200
        status, _ = await conn.request("POST", f"/v1/sessions/{sid}/switch")
        t2 = time.perf_counter()
        assert status == 200
        gets.append((t1 - t0) * 1000)
        switches.append((t2 - t1) * 1000)
    conn.close()
    return {"get_p50_ms": pct(gets, 0.5), "get_p99_ms": pct(gets, 0.99),
            "switch_p50_ms": pct(switches, 0.5), "switch_p99_ms": pct(switches, 0.99)}


async def expiry_lateness(host: str, port: int, token: str, n: int) -> list[float]:
    """Start `n` sessions with a 1.5-3 s bank, each watched by a raw socket; lateness in ms of
    every TIME_EXPIRED (server timestamp - deadline)."""
    expired: dict[str, int] = {}
    done = asyncio.Event()

    def on_text(ws: RawWs, payload: bytes, now: int) -> None:
        frame = json.loads(payload)
        if frame.get("type") == "TIME_EXPIRED":
            expired[frame["sessionId"]] = frame["timestamp"]
            if len(expired) >= n:
                done.set()

    conn = await RawHttp(host, port, token).open()
    deadlines: dict[str, int] = {}
    sockets = []
    for _ in range(n):
        body = session_body()
        bank = random.randint(1500, 3000)
        for p in body["participants"]:
            p["total_time_ms"] = bank
        body["total_time_ms"] = 2 * bank
        status, data = await conn.request("POST", "/v1/sessions", json.dumps(body).encode())
        assert status == 201, data
        sid = body["session_id"]
        sockets.append(await open_ws(host, port, f"/ws?sessionId={sid}&token={token}", on_text))
        status, data = await conn.request("POST", f"/v1/sessions/{sid}/start")
        assert status == 200, data
        deadlines[sid] = json.loads(data)["data"]["server_time_ms"] + bank
    try:
        await asyncio.wait_for(done.wait(), 30)
    except TimeoutError:
        pass
    conn.close()
    for ws in sockets:
        if ws.transport is not None:
            ws.transport.close()
    return [float(expired[sid] - deadlines[sid]) for sid in expired]


async def switch_load(host: str, port: int, token: str, sids: list[str], rps: float, stop: asyncio.Event,
                      conns: int = 8) -> int:
    """Switch random live sessions at `rps` per second (spread over `conns` connections) until
    `stop`; returns how many were sent."""
    pool = [await RawHttp(host, port, token).open() for _ in range(conns)]
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


async def loop_lag(host: str, port: int) -> dict[str, float]:
    """The server's `kairos_event_loop_lag_seconds` histogram: count, sum and bucket counts."""
    import httpx

    async with httpx.AsyncClient() as c:
        text = (await c.get(f"http://{host}:{port}/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kairos_event_loop_lag_seconds"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def lag_between(a: dict[str, float], b: dict[str, float]) -> str:
    """Share of 100 ms wake-ups later than 5/10/25 ms between two scrapes."""
    count = b.get("kairos_event_loop_lag_seconds_count", 0) - a.get("kairos_event_loop_lag_seconds_count", 0)
    if count <= 0:
        return "no samples"
    parts = []
    for le in ("0.005", "0.01", "0.025"):
        key = f'kairos_event_loop_lag_seconds_bucket{{le="{le}"}}'
        late = count - (b.get(key, 0) - a.get(key, 0))
        parts.append(f">{float(le) * 1000:.0f} ms {100 * late / count:.1f}%")
    mean = (b.get("kairos_event_loop_lag_seconds_sum", 0) - a.get("kairos_event_loop_lag_seconds_sum", 0)) / count
    return f"mean {mean * 1000:.2f} ms, " + ", ".join(parts)


async def measure(host: str, port: int, token: str, pid: int | None, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One size on a fresh server."""
    pids = serving_pids(pid) if pid else []
    rss0 = sum(rss_kb(p) for p in pids)
    t0 = time.perf_counter()
    sids = await create_live(host, port, token, n, args.conns)
    create_s = time.perf_counter() - t0
    rss1 = sum(rss_kb(p) for p in pids)
    lat = await sample_latency(host, port, token, sids, args.sample)
    lag0 = await loop_lag(host, port)
    quiet = await expiry_lateness(host, port, token, args.expiring)
    lag1 = await loop_lag(host, port)
    stop = asyncio.Event()
    load = asyncio.create_task(switch_load(host, port, token, sids, args.load_rps, stop))
    t1 = time.perf_counter()
    loaded = await expiry_lateness(host, port, token, args.expiring)
    stop.set()
    sent = await load
    load_rate = sent / (time.perf_counter() - t1)
    lag2 = await loop_lag(host, port)
    return {"sessions": n, "create_s": create_s, "rss_before_mb": rss0 / 1024, "rss_after_mb": rss1 / 1024,
            "rss_kb_per_session": (rss1 - rss0) / max(1, n), **lat,
            "quiet_expired": len(quiet), "quiet_p50_ms": pct(quiet, 0.5), "quiet_p99_ms": pct(quiet, 0.99),
            "quiet_max_ms": max(quiet, default=float("nan")), "quiet_lag": lag_between(lag0, lag1),
            "load_rps": load_rate, "load_expired": len(loaded), "load_p50_ms": pct(loaded, 0.5),
            "load_p99_ms": pct(loaded, 0.99), "load_max_ms": max(loaded, default=float("nan")),
            "load_lag": lag_between(lag1, lag2), "expiring": args.expiring}


def report(r: dict[str, Any]) -> str:
    """The human-readable summary of one size."""
    ok = r["load_p99_ms"] <= 10 and r["load_max_ms"] <= 25
    return "\n".join([
        f"{r['sessions']} live sessions (created in {r['create_s']:.1f} s):",
        f"  server RSS {r['rss_before_mb']:.1f} -> {r['rss_after_mb']:.1f} MB ({r['rss_kb_per_session']:.2f} KB/session)",
        f"  sample: GET p50 {r['get_p50_ms']:.2f} / p99 {r['get_p99_ms']:.2f} ms, switch p50 "
        f"{r['switch_p50_ms']:.2f} / p99 {r['switch_p99_ms']:.2f} ms",
        f"  expiry lateness, quiet: {r['quiet_expired']}/{r['expiring']} expired, p50 {r['quiet_p50_ms']:.0f}"
        f" / p99 {r['quiet_p99_ms']:.0f} / max {r['quiet_max_ms']:.0f} ms; loop lag {r['quiet_lag']}",
        f"  expiry lateness, {r['load_rps']:.0f} switches/s: {r['load_expired']}/{r['expiring']} expired, p50 "
        f"{r['load_p50_ms']:.0f} / p99 {r['load_p99_ms']:.0f} / max {r['load_max_ms']:.0f} ms "
        f"(target p99 <= 10, max <= 25: {'OK' if ok else 'MISS'}); loop lag {r['load_lag']}",
    ])


def main(argv: list[str]) -> None:
    """`python -m bench capacity --sessions 10000,100000`."""
    p = argparse.ArgumentParser(prog="python -m bench capacity")
    p.add_argument("--sessions", default="10000,100000", help="comma-separated live-session counts")
    p.add_argument("--conns", type=int, default=16, help="connections creating the sessions")
    p.add_argument("--sample", type=int, default=300, help="sessions sampled for GET/switch latency")
    p.add_argument("--expiring", type=int, default=500, help="short sessions whose expiry is timed")
    p.add_argument("--load-rps", type=float, default=300, help="steady switch load during the second run")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from tests.servers import KairosServer, server_env

    results = []
    for n in [int(x) for x in args.sessions.split(",")]:
        env = server_env(args.redis_url or "", args.database_url, f"bench-capacity:{uuid.uuid4().hex[:8]}:",
                         KAIROS_RATE_LIMIT_GENERAL="0", KAIROS_RATE_LIMIT_SWITCH="0")
        if not args.redis_url:
            env.pop("KAIROS_REDIS_URL")
        server = KairosServer(env, ready_timeout_s=60).start()
        try:
            server.wait_ready(60)
            r = asyncio.run(measure("127.0.0.1", server.port, server.token("bench"), server.pid, n, args))
        finally:
            server.stop(60)
        print(report(r), flush=True)
        results.append(r)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
