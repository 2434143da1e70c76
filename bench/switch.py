"""`python -m bench switch`: switch latency and throughput over HTTP and WebSocket.

Starts a real `kairos serve` (tests/servers.py; embedded Redis/PostgreSQL unless --redis-url /
--database-url are given) or uses --url. Measures, with a minimal keep-alive HTTP/1.1 client so the
client costs as little as possible on a 2-core machine:

1. sequential HTTP switch p50/p99 and GET /health p50, interleaved on the same connection;
2. concurrent switches over 64 sessions with 16 connections: requests/s, p50/p99;
3. WebSocket SWITCH command round trip (send -> ACK) p50/p99.

Targets (issue 4): switch p50 <= 1.5 x health p50; switch p99 <= 4 x switch p50; WS p50 <= 1 ms;
>= 1000 switches/s at 16 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU time of a process and its children so far (Linux /proc), or 0."""
    if pid is None:
        return 0.0
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return ticks / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(int(k)) for k in kids)


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


class RawHttp:
    """One keep-alive HTTP/1.1 connection; just enough protocol for these requests."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token

    async def open(self) -> RawHttp:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        if not status_line:  # the server closed the keep-alive connection: reopen, resend once
            await self.open()
            self.writer.write(head.encode() + body)
            status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    def close(self) -> None:
        self.writer.close()


def session_body(n: int = 2) -> dict[str, Any]:
    return {"session_id": str(uuid.uuid4()), "sync_mode": "per_participant",
            "participants": [{"participant_id": str(uuid.uuid4()), "total_time_ms": 86_400_000} for _ in range(n)],
            "total_time_ms": 86_400_000}


async def make_running(conn: RawHttp) -> str:
    body = session_body()
    status, data = await conn.request("POST", "/v1/sessions", json.dumps(body).encode())
    assert status == 201, data
    status, data = await conn.request("POST", f"/v1/sessions/{body['session_id']}/start")
    assert status == 200, data
    return body["session_id"]


async def sequential(host: str, port: int, token: str, n: int) -> dict[str, float]:
    conn = await RawHttp(host, port, token).open()
    sid = await make_running(conn)
    for _ in range(200):  # warm-up
        await conn.request("POST", f"/v1/sessions/{sid}/switch")
        await conn.request("GET", "/health")
    sw: list[float] = []
    hl: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = await conn.request("POST", f"/v1/sessions/{sid}/switch")
        t1 = time.perf_counter()
        await conn.request("GET", "/health")
        t2 = time.perf_counter()
        assert status == 200
        sw.append((t1 - t0) * 1000)
        hl.append((t2 - t1) * 1000)
    conn.close()
    return {"switch_p50_ms": pct(sw, 0.5), "switch_p99_ms": pct(sw, 0.99),
            "health_p50_ms": pct(hl, 0.5), "health_p99_ms": pct(hl, 0.99)}


async def concurrent(host: str, port: int, token: str, sessions: int, conns: int, seconds: float) -> dict[str, float]:
    setup = await RawHttp(host, port, token).open()
    sids = [await make_running(setup) for _ in range(sessions)]
    setup.close()
    pool = [await RawHttp(host, port, token).open() for _ in range(conns)]
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(i: int, conn: RawHttp) -> None:
        nonlocal errors
        k = i
        while time.perf_counter() < stop_at:
            sid = sids[k % len(sids)]
            k += conns
            t0 = time.perf_counter()
            status, _ = await conn.request("POST", f"/v1/sessions/{sid}/switch")
            lat.append((time.perf_counter() - t0) * 1000)
            errors += status != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(pool)))
    elapsed = time.perf_counter() - t0
    for c in pool:
        c.close()
    return {"rps": len(lat) / elapsed, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "requests": len(lat), "errors": errors}


async def websocket_rtt(host: str, port: int, token: str, n: int) -> dict[str, float]:
    from websockets.asyncio.client import connect

    conn = await RawHttp(host, port, token).open()
    sid = await make_running(conn)
    conn.close()
    lat: list[float] = []
    async with connect(f"ws://{host}:{port}/ws?sessionId={sid}&token={token}", compression=None) as ws:
        await ws.recv()
        for i in range(n + 200):
            rid = f"r{i}"
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "SWITCH", "request_id": rid}))
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("request_id") == rid:
                    break
            if i >= 200:  # warm-up excluded
                assert frame["type"] == "ACK", frame
                lat.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "mean_ms": statistics.fmean(lat)}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench switch")
    p.add_argument("--url", help="use this running server (needs --token, limits off)")
    p.add_argument("--token")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--n", type=int, default=3000, help="sequential samples")
    p.add_argument("--seconds", type=float, default=8.0, help="concurrent phase length")
    p.add_argument("--workers", type=int, default=1, help="kairos serve --workers")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    server = None
    if args.url:
        from urllib.parse import urlsplit

        u = urlsplit(args.url)
        host, port, token = u.hostname or "127.0.0.1", u.port or 80, args.token or ""
    else:
        from tests.servers import KairosServer, server_env

        env = server_env(args.redis_url or "", args.database_url, f"bench:{uuid.uuid4().hex[:8]}:",
                         KAIROS_RATE_LIMIT_GENERAL="0", KAIROS_RATE_LIMIT_SWITCH="0")
        if not args.redis_url:
            env.pop("KAIROS_REDIS_URL")
        server = KairosServer(env, workers=args.workers, ready_timeout_s=60).start()
        host, port, token = "127.0.0.1", server.port, server.token("bench")
    try:
        if server is not None:
            server.wait_ready(60)
        seq = asyncio.run(sequential(host, port, token, args.n))
        pid = server.pid if server is not None else None
        cpu0 = cpu_seconds(pid)
        conc = asyncio.run(concurrent(host, port, token, 64, 16, args.seconds))
        conc["server_cpu_ms_per_switch"] = (cpu_seconds(pid) - cpu0) * 1000 / max(1, conc["requests"])
        wsr = asyncio.run(websocket_rtt(host, port, token, args.n))
    finally:
        if server is not None:
            server.stop()
    ratio = seq["switch_p50_ms"] / seq["health_p50_ms"]
    tail = seq["switch_p99_ms"] / seq["switch_p50_ms"]
    print("sequential HTTP (one keep-alive connection, interleaved):")
    print(f"  switch p50 {seq['switch_p50_ms']:.3f} ms  p99 {seq['switch_p99_ms']:.3f} ms")
    print(f"  health p50 {seq['health_p50_ms']:.3f} ms  p99 {seq['health_p99_ms']:.3f} ms")
    print(f"  switch p50 / health p50 = {ratio:.2f}  (target <= 1.5)  {'OK' if ratio <= 1.5 else 'MISS'}")
    print(f"  switch p99 / switch p50 = {tail:.2f}  (target <= 4)    {'OK' if tail <= 4 else 'MISS'}")
    print(f"concurrent: 64 sessions x 16 connections, {args.seconds:.0f} s:")
    print(f"  {conc['rps']:.0f} switches/s (target >= 1000) {'OK' if conc['rps'] >= 1000 else 'MISS'}"
          f"  p50 {conc['p50_ms']:.3f} ms  p99 {conc['p99_ms']:.3f} ms  errors {conc['errors']}")
    if conc["server_cpu_ms_per_switch"]:
        print(f"  server CPU per switch {conc['server_cpu_ms_per_switch']:.3f} ms (all of its work, "
              "audit worker included: the load-independent cost)")
    print("WebSocket SWITCH -> ACK round trip:")
    print(f"  p50 {wsr['p50_ms']:.3f} ms  p99 {wsr['p99_ms']:.3f} ms  (target p50 <= 1 ms) "
          f"{'OK' if wsr['p50_ms'] <= 1 else 'MISS'}")
