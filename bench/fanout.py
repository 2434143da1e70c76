"""`python -m bench fanout`: how fast one update reaches every watcher of a session.

Starts a real `kairos serve` (tests/servers.py; embedded Redis/PostgreSQL unless --redis-url /
--database-url are given) or uses --url. For each size in --sockets, --clients separate client
processes (raw WebSocket clients, bench/_wsraw.py) open that many sockets spread over --sessions
sessions; a driver socket then sends SWITCH commands one at a time, and waits until every socket
has the matching STATE_UPDATE (by version) before the next. Reports:

- per delivery (every socket x switch): p50/p99/max from sending the command to the frame's
  arrival; all sockets served (per switch, the slowest socket): p50/p99/max;
- missed versions (a socket that never got a version it should have; must be 0);
- connect time of all sockets (first connect -> last CONNECTED frame), p50/p99 per socket;
- server RSS before/after connecting (and per socket), server CPU per delivered frame, the split
  of sockets over `--workers` processes, and each client process's own event-loop lag (a
  saturated client makes every figure look worse: it shows here).

Targets (issue 11): p99 <= 5 ms at 100 watchers, <= 20 ms at 1,000, <= 60 ms at 5,000,
<= 100 ms at 10,000 on one process; connect 1,000 in <= 0.2 s, 10,000 in <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._wsraw import RawWs, open_ws  # noqa: E402

_REPO = str(Path(__file__).resolve().parent.parent)
_TARGET_P99_MS = {100: 5, 1000: 20, 5000: 60, 10000: 100}
_TARGET_CONNECT_S = {1000: 0.2, 10000: 2.0}


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `samples`; nan when empty."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------- client process


class Watchers:
    """The sockets of one client process and what each of them received."""

    def __init__(self) -> None:
        self.sockets: list[RawWs] = []
        self.seen: dict[RawWs, dict[int, int]] = {}  # socket -> version -> arrival (monotonic ns)
        self.per_session: dict[str, int] = {}  # session -> sockets here
        self.count: dict[tuple[str, int], int] = {}  # (session, version) -> sockets that have it
        self.waiting: dict[tuple[str, int], asyncio.Future[None]] = {}
        self.connected: dict[RawWs, int] = {}
        self.hello: dict[RawWs, asyncio.Future[None]] = {}
        self.parsed: dict[bytes, tuple[str, int | None]] = {}  # same bytes on every socket: parse once
        self.lag_ms: list[float] = []

    def on_text(self, ws: RawWs, payload: bytes, now: int) -> None:
        kind_version = self.parsed.get(payload)
        if kind_version is None:
            frame = json.loads(payload)
            state = frame.get("state") or {}
            kind_version = self.parsed[payload] = (frame.get("type", ""), state.get("version"))
            if len(self.parsed) > 4096:
                self.parsed.clear()
        kind, version = kind_version
        if kind == "CONNECTED":
            self.connected[ws] = now
            fut = self.hello.pop(ws, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == "STATE_UPDATE" and version is not None:
            self.seen[ws][version] = now
            key = (ws.tag, version)  # type: ignore[assignment]
            n = self.count[key] = self.count.get(key, 0) + 1
            fut = self.waiting.get(key)
            if fut is not None and n >= self.per_session[ws.tag] and not fut.done():  # type: ignore[index]
                fut.set_result(None)

    async def connect(self, host: str, port: int, token: str, sid: str, gate: asyncio.Semaphore,
                      times: list[float]) -> None:
        """Open one socket and wait for its CONNECTED frame; its connect time goes to `times`."""
        async with gate:
            t0 = time.monotonic_ns()
            try:
                ws = await open_ws(host, port, f"/ws?sessionId={sid}&token={token}", self.on_text)
            except OSError:
                return
            ws.tag = sid
            self.seen[ws] = {}
            self.sockets.append(ws)
            if ws not in self.connected:
                hello = self.hello[ws] = asyncio.get_running_loop().create_future()
                await asyncio.wait([hello, ws.closed], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if ws in self.connected:
                times.append((self.connected[ws] - t0) / 1e6)

    async def wait_version(self, sid: str, version: int, timeout_s: float) -> bool:
        if self.count.get((sid, version), 0) >= self.per_session.get(sid, 0):
            return True
        fut = self.waiting.setdefault((sid, version), asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting.pop((sid, version), None)


async def _lag_probe(lags: list[float], period_s: float = 0.005) -> None:
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period_s)
        lags.append((time.perf_counter() - t0 - period_s) * 1000)


async def _client(host: str, port: int, token: str, concurrency: int) -> None:
    """One client process: reads JSON commands on stdin, answers one JSON line each on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    w = Watchers()
    probe: asyncio.Task[None] | None = None

    def answer(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = json.loads(line)
        if cmd["op"] == "connect":
            sids = cmd["sids"]
            for sid in sids:
                w.per_session[sid] = w.per_session.get(sid, 0) + 1
            gate = asyncio.Semaphore(concurrency)
            times: list[float] = []
            start = time.monotonic_ns()
            await asyncio.gather(*(w.connect(host, port, token, sid, gate, times) for sid in sids))
            answer({"start_ns": start, "end_ns": time.monotonic_ns(), "connected": len(times),
                    "failed": len(sids) - len(times), "connect_ms": times})
            probe = asyncio.create_task(_lag_probe(w.lag_ms))
        elif cmd["op"] == "wait":
            ok = await w.wait_version(cmd["sid"], cmd["version"], cmd["timeout_s"])
            answer({"ok": ok})
        elif cmd["op"] == "lag_reset":
            w.lag_ms.clear()
            answer({})
        elif cmd["op"] == "report":
            if probe is not None:
                probe.cancel()
            answer({"sockets": [[ws.tag, w.seen[ws], ws.close_code] for ws in w.sockets],
                    "lag_ms": w.lag_ms})
        elif cmd["op"] == "quit":
            for ws in w.sockets:
                if ws.transport is not None:
                    ws.transport.close()
            answer({})
            return


class ClientProc:
    """The coordinator's handle on one client process."""

    def __init__(self, proc: asyncio.subprocess.Process, sids: list[str]) -> None:
        self.proc, self.sids = proc, sids

    @classmethod
    async def spawn(cls, host: str, port: int, token: str, sids: list[str], concurrency: int) -> ClientProc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fanout", "--client", host, str(port), token, str(concurrency),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 28,
            cwd=_REPO)
        return cls(proc, sids)

    async def call(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client process exited ({self.proc.returncode})")
        return json.loads(line)


# ---------------------------------------------------------------- server-side figures


def proc_tree(pid: int) -> list[int]:
    """`pid` and its children (the --workers processes)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid, *(int(k) for k in kids)]


def rss_kb(pid: int) -> int:
    """Resident memory of one process, KB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def socket_fds(pid: int) -> int:
    """Open sockets of one process."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    except OSError:
        pass
    return n


def serving_pids(pid: int) -> list[int]:
    """The processes that serve sockets: the workers when there are any, else `pid` itself."""
    tree = proc_tree(pid)
    return tree[1:] or tree


# ---------------------------------------------------------------- coordinator


async def _http(host: str, port: int, token: str, method: str, path: str, body: Any = None) -> Any:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        r = await c.request(method, path, json=body)
        r.raise_for_status()
        return r.json() if r.content else None


async def make_sessions(host: str, port: int, token: str, k: int) -> list[str]:
    """`k` running sessions of two participants with a day on each clock."""
    sids = []
    for _ in range(k):
        body = {"session_id": str(uuid.uuid4()), "sync_mode": "per_participant",
                "total_time_ms": 86_400_000,
                "participants": [{"participant_id": str(uuid.uuid4()), "total_time_ms": 86_400_000}
                                 for _ in range(2)]}
        await _http(host, port, token, "POST", "/v1/sessions", body)
        await _http(host, port, token, "POST", f"/v1/sessions/{body['session_id']}/start")
        sids.append(body["session_id"])
    return sids


class Driver:
    """One socket per session that sends the SWITCH commands and reads their ACKs."""

    def __init__(self) -> None:
        self.acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.sockets: dict[str, RawWs] = {}

    def on_text(self, ws: RawWs, payload: bytes, now: int) -> None:
        frame = json.loads(payload)
        fut = self.acks.pop(frame.get("request_id") or "", None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    async def open(self, host: str, port: int, token: str, sids: list[str]) -> None:
        for sid in sids:
            self.sockets[sid] = await open_ws(host, port, f"/ws?sessionId={sid}&token={token}", self.on_text)

    async def switch(self, sid: str) -> tuple[int, int]:
        """Send SWITCH; returns (send time in monotonic ns, the new version)."""
        rid = uuid.uuid4().hex
        fut = self.acks[rid] = asyncio.get_running_loop().create_future()
        t0 = time.monotonic_ns()
        self.sockets[sid].send_text(json.dumps({"type": "SWITCH", "request_id": rid}))
        frame = await asyncio.wait_for(fut, 30)
        assert frame["type"] == "ACK", frame
        return t0, frame["data"]["version"]

    def close(self) -> None:
        for ws in self.sockets.values():
            if ws.transport is not None:
                ws.transport.close()


async def measure(host: str, port: int, token: str, pid: int | None, sockets: int, sids: list[str],
                  clients: int, switches: int, concurrency: int) -> dict[str, Any]:
    """One size: connect `sockets` watchers, run `switches` switches, gather the figures."""
    pids = serving_pids(pid) if pid else []
    rss0 = sum(rss_kb(p) for p in pids)
    fds0 = [socket_fds(p) for p in pids]
    assign = [sids[i % len(sids)] for i in range(sockets)]
    shares = [assign[i::clients] for i in range(clients)]
    procs = [await ClientProc.spawn(host, port, token, share, concurrency) for share in shares if share]
    driver = Driver()
    try:
        cpu_connect0 = sum(cpu_s(p) for p in pids)
        conns = await asyncio.gather(*(c.call(op="connect", sids=c.sids) for c in procs))
        cpu_connect = sum(cpu_s(p) for p in pids) - cpu_connect0
        connect_s = (max(c["end_ns"] for c in conns) - min(c["start_ns"] for c in conns)) / 1e9
        connected = sum(c["connected"] for c in conns)
        failed = sum(c["failed"] for c in conns)
        per_connect = [t for c in conns for t in c["connect_ms"]]
        rss1 = sum(rss_kb(p) for p in pids)
        split = [socket_fds(p) - f for p, f in zip(pids, fds0, strict=True)]
        await driver.open(host, port, token, sids)
        sent: dict[tuple[str, int], int] = {}
        timeouts = 0
        warmup = 3
        cpu0 = 0.0
        for i in range(switches + warmup):
            if i == warmup:
                await asyncio.gather(*(c.call(op="lag_reset") for c in procs))
                cpu0 = sum(cpu_s(p) for p in pids)
            sid = sids[i % len(sids)]
            t0, version = await driver.switch(sid)
            if i >= warmup:
                sent[(sid, version)] = t0
            oks = await asyncio.gather(*(c.call(op="wait", sid=sid, version=version, timeout_s=10)
                                         for c in procs))
            timeouts += sum(not o["ok"] for o in oks)
            await asyncio.sleep(0.01)  # a short quiet gap between switches
        cpu = sum(cpu_s(p) for p in pids) - cpu0
        reports = await asyncio.gather(*(c.call(op="report") for c in procs))
    finally:
        driver.close()
        for c in procs:
            try:
                await asyncio.wait_for(c.call(op="quit"), 10)
            except (RuntimeError, TimeoutError, BrokenPipeError, ConnectionResetError):
                pass
            if c.proc.returncode is None:
                try:
                    await asyncio.wait_for(c.proc.wait(), 10)
                except TimeoutError:
                    c.proc.kill()
    per_delivery: list[float] = []
    slowest: dict[tuple[str, int], float] = {}
    missed = 0
    closed = 0
    for rep in reports:
        for sid, seen, close_code in rep["sockets"]:
            closed += close_code is not None
            for (s, v), t0 in sent.items():
                if s != sid:
                    continue
                arrival = seen.get(str(v))
                if arrival is None:
                    missed += 1
                    continue
                ms = (arrival - t0) / 1e6
                per_delivery.append(ms)
                slowest[(s, v)] = max(slowest.get((s, v), 0.0), ms)
    all_served = list(slowest.values())
    lags = [max(r["lag_ms"], default=0.0) for r in reports]
    lag_p99 = [pct(r["lag_ms"], 0.99) for r in reports]
    return {
        "sockets": sockets, "sessions": len(sids), "connected": connected, "connect_failed": failed,
        "connect_s": connect_s, "connect_p50_ms": pct(per_connect, 0.5),
        "connect_p99_ms": pct(per_connect, 0.99),
        "connect_cpu_us_per_socket": cpu_connect * 1e6 / max(1, connected),
        "p50_ms": pct(per_delivery, 0.5), "p99_ms": pct(per_delivery, 0.99),
        "max_ms": max(per_delivery, default=float("nan")),
        "all_p50_ms": pct(all_served, 0.5), "all_p99_ms": pct(all_served, 0.99),
        "all_max_ms": max(all_served, default=float("nan")),
        "missed": missed, "wait_timeouts": timeouts, "closed_by_server": closed,
        "switches": len(sent), "rss_before_mb": rss0 / 1024, "rss_after_mb": rss1 / 1024,
        "rss_kb_per_socket": (rss1 - rss0) / max(1, connected),
        "cpu_us_per_frame": cpu * 1e6 / max(1, len(per_delivery)),
        "split": split, "client_lag_max_ms": lags, "client_lag_p99_ms": lag_p99,
    }


def report_line(r: dict[str, Any]) -> str:
    """The human-readable summary of one size."""
    target = _TARGET_P99_MS.get(r["sockets"])
    verdict = "" if target is None else f" (target p99 <= {target} ms: {'OK' if r['p99_ms'] <= target else 'MISS'})"
    ctarget = _TARGET_CONNECT_S.get(r["sockets"])
    cverdict = "" if ctarget is None else f" (target <= {ctarget} s: {'OK' if r['connect_s'] <= ctarget else 'MISS'})"
    return "\n".join([
        f"{r['sockets']} sockets over {r['sessions']} session(s), {r['switches']} switches:",
        f"  per delivery  p50 {r['p50_ms']:.1f}  p99 {r['p99_ms']:.1f}  max {r['max_ms']:.1f} ms{verdict}",
        f"  all served    p50 {r['all_p50_ms']:.1f}  p99 {r['all_p99_ms']:.1f}  max {r['all_max_ms']:.1f} ms",
        f"  missed versions {r['missed']}  wait timeouts {r['wait_timeouts']}  closed by server "
        f"{r['closed_by_server']}",
        f"  connect {r['connected']} in {r['connect_s']:.3f} s{cverdict}  per socket p50 "
        f"{r['connect_p50_ms']:.1f} / p99 {r['connect_p99_ms']:.1f} ms  failed {r['connect_failed']}  "
        f"server CPU {r['connect_cpu_us_per_socket']:.0f} us/socket",
        f"  server RSS {r['rss_before_mb']:.1f} -> {r['rss_after_mb']:.1f} MB "
        f"({r['rss_kb_per_socket']:.1f} KB/socket)  CPU {r['cpu_us_per_frame']:.1f} us per delivered frame",
        f"  sockets per serving process {r['split']}",
        "  client loop lag max " + " / ".join(f"{x:.1f}" for x in r["client_lag_max_ms"])
        + " ms, p99 " + " / ".join(f"{x:.1f}" for x in r["client_lag_p99_ms"]) + " ms",
    ])


async def run(args: argparse.Namespace, host: str, port: int, token: str, pid: int | None) -> list[dict[str, Any]]:
    sids = await make_sessions(host, port, token, args.sessions)
    results = []
    for n in [int(x) for x in args.sockets.split(",")]:
        r = await measure(host, port, token, pid, n, sids, args.clients, args.switches, args.concurrency)
        print(report_line(r), flush=True)
        results.append(r)
        if pid:  # let the server notice the closed sockets before the next size
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(socket_fds(p) for p in serving_pids(pid)) > 50 * len(serving_pids(pid)):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    return results


def main(argv: list[str]) -> None:
    """`python -m bench fanout --sockets 100,1000 [--sessions K] [--workers N]`."""
    if argv and argv[0] == "--client":
        _, host, port, token, concurrency = argv
        _use_uvloop()
        asyncio.run(_client(host, int(port), token, int(concurrency)))
        return
    p = argparse.ArgumentParser(prog="python -m bench fanout")
    p.add_argument("--sockets", default="100,1000,5000", help="comma-separated sizes")
    p.add_argument("--sessions", type=int, default=1, help="sessions the sockets are spread over")
    p.add_argument("--workers", type=int, default=1, help="kairos serve --workers")
    p.add_argument("--clients", type=int, default=4, help="client processes")
    p.add_argument("--switches", type=int, default=30, help="measured switches per size")
    p.add_argument("--concurrency", type=int, default=64, help="connects in flight per client")
    p.add_argument("--url", help="use this running server (needs --token, limits off)")
    p.add_argument("--token")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = p.parse_args(argv)
    _use_uvloop()
    server = None
    if args.url:
        from urllib.parse import urlsplit

        u = urlsplit(args.url)
        host, port, token, pid = u.hostname or "127.0.0.1", u.port or 80, args.token or "", None
    else:
        from tests.servers import KairosServer, server_env

        env = server_env(args.redis_url or "", args.database_url, f"bench-fanout:{uuid.uuid4().hex[:8]}:",
                         KAIROS_RATE_LIMIT_GENERAL="0", KAIROS_RATE_LIMIT_SWITCH="0")
        if not args.redis_url:
            env.pop("KAIROS_REDIS_URL")
        server = KairosServer(env, workers=args.workers, ready_timeout_s=60).start()
        server.wait_ready(60)
        host, port, token, pid = "127.0.0.1", server.port, server.token("bench"), server.pid
    try:
        results = asyncio.run(run(args, host, port, token, pid))
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps(results))


def _use_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
