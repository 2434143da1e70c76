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
- server RSS before/after connecting (and per socket), server CPU per delivered frame (next to
  the floor: this process's own CPU per bare `send()` of one frame over as many loopback sockets
  read by as many processes, which on loopback includes the receiving side's TCP work and
  wake-up; and how long one such pass takes), the split
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
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench._wsraw import RawWs, open_ws
from bench.client import RawHttp, start_session
from bench.report import BenchError, Report
from bench.servers import proc_status, process_cpu_s
from bench.stats import quantile
from bench.target import Target, add_target_arguments, check_target_arguments, kairos

_REPO = str(Path(__file__).resolve().parent.parent)
TARGET_P99_MS = {100: 5, 1000: 20, 5000: 60, 10000: 100}
TARGET_CONNECT_S = {1000: 0.2, 10000: 2.0}
QUICK: dict[str, Any] = {"sockets": "50", "switches": 5, "clients": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench fanout`."""
    p.add_argument("--sockets", default="100,1000,5000", help="comma-separated numbers of watchers")
    p.add_argument("--sessions", type=int, default=1, help="sessions the watchers are spread over")
    p.add_argument("--clients", type=int, default=4, help="client processes holding the watchers")
    p.add_argument("--switches", type=int, default=30, help="measured switches per size (after 3 warm-up)")
    p.add_argument("--concurrency", type=int, default=64, help="connects in flight per client process")
    p.add_argument("--slow-reader", action="store_true",
                   help="then run the switches again with one more watcher that never reads, until the "
                        "server drops it (expected close code 1013)")
    p.add_argument("--slow-max-switches", type=int, default=5000,
                   help="with --slow-reader: switches sent at most (and 60 s) until the server closes it")
    p.add_argument("--send-queue", type=int, default=None,
                   help="KAIROS_WS_SEND_QUEUE of a server started here (KB a socket may leave unsent before "
                        "it is dropped with 1013, on top of the kernel's send buffer: up to 4 MB on Linux)")
    add_target_arguments(p)


def check_arguments(args: argparse.Namespace) -> None:
    """Sizes must be positive whole numbers; target options must agree."""
    check_target_arguments(args)
    try:
        sizes = [int(x) for x in str(args.sockets).split(",")]
    except ValueError as e:
        raise BenchError(f"--sockets must be comma-separated numbers, got {args.sockets!r}") from e
    if min(*sizes, args.sessions, args.clients, args.switches, args.concurrency, args.slow_max_switches,
           args.send_queue or 1) < 1:
        raise BenchError("--sockets, --sessions, --clients, --switches, --concurrency, --slow-max-switches "
                         "and --send-queue must be positive")
    if args.send_queue is not None and args.url:
        raise BenchError("--send-queue applies to a server started here, not to --url")


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `samples`; nan when empty."""
    return quantile(sorted(samples), q) if samples else float("nan")


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

    async def connect(self, host: str, port: int, auth: str, sid: str, gate: asyncio.Semaphore,
                      times: list[float]) -> None:
        """Open one socket and wait for its CONNECTED frame; its connect time goes to `times`."""
        async with gate:
            t0 = time.monotonic_ns()
            try:
                ws = await open_ws(host, port, f"/ws?sessionId={sid}{auth}", self.on_text)
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


async def _client(host: str, port: int, auth: str, concurrency: int) -> None:
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
            await asyncio.gather(*(w.connect(host, port, auth, sid, gate, times) for sid in sids))
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
    async def spawn(cls, target: Target, sids: list[str], concurrency: int) -> ClientProc:
        u = urlsplit(target.url)
        auth = f"&token={target.token}" if target.token else ""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fanout", "--client", u.hostname or "127.0.0.1", str(u.port or 80),
            auth, str(concurrency),
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
    return proc_status(pid, "VmRSS")


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


def holds_connection_from(pids: list[int], client_port: int) -> bool:
    """Whether one of `pids` still has a descriptor on its TCP connection from local port
    `client_port` (the kernel may keep an orphaned connection a while: that costs no descriptor)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[2].rsplit(":", 1)[1], 16) == client_port and f[9] != "0":
                inodes.add(f"socket:[{f[9]}]")
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return True
                except OSError:
                    pass
        except OSError:
            pass
    return False


def serving_pids(pid: int) -> list[int]:
    """The processes that serve sockets: the workers when there are any, else `pid` itself."""
    tree = proc_tree(pid)
    return tree[1:] or tree


# ---------------------------------------------------------------- coordinator


async def make_sessions(target: Target, k: int) -> list[str]:
    """`k` running sessions of two participants with a day on each clock."""
    conn = await RawHttp(target.url, target.token).open()
    try:
        return [await start_session(conn) for _ in range(k)]
    finally:
        conn.close()


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

    async def open(self, target: Target, sids: list[str]) -> None:
        u = urlsplit(target.url)
        auth = f"&token={target.token}" if target.token else ""
        for sid in sids:
            self.sockets[sid] = await open_ws(u.hostname or "127.0.0.1", u.port or 80,
                                              f"/ws?sessionId={sid}{auth}", self.on_text)

    async def switch(self, sid: str) -> tuple[int, int, int]:
        """Send SWITCH; returns (send time in monotonic ns, the new version, ACK time in ns)."""
        rid = uuid.uuid4().hex
        fut = self.acks[rid] = asyncio.get_running_loop().create_future()
        t0 = time.monotonic_ns()
        self.sockets[sid].send_text(json.dumps({"type": "SWITCH", "request_id": rid}))
        frame = await asyncio.wait_for(fut, 30)
        if frame["type"] != "ACK":
            raise BenchError(f"SWITCH answered {frame}")
        return t0, frame["data"]["version"], time.monotonic_ns()

    def close(self) -> None:
        for ws in self.sockets.values():
            if ws.transport is not None:
                ws.transport.close()


class SlowReader:
    """One extra watcher that never reads: a tiny kernel receive buffer and reading paused once
    CONNECTED arrived, so the server's unsent bytes for it grow with every update."""

    def __init__(self) -> None:
        self.ws: RawWs | None = None
        self.connected = asyncio.Event()

    def on_text(self, ws: RawWs, payload: bytes, now: int) -> None:
        if b'"CONNECTED"' in payload[:32] and ws.transport is not None:
            ws.transport.pause_reading()
            self.connected.set()

    async def open(self, target: Target, sid: str) -> None:
        u = urlsplit(target.url)
        auth = f"&token={target.token}" if target.token else ""
        self.ws = await open_ws(u.hostname or "127.0.0.1", u.port or 80, f"/ws?sessionId={sid}{auth}",
                                self.on_text, rcvbuf=4096)
        await asyncio.wait_for(self.connected.wait(), 30)

    async def close_code(self, timeout_s: float = 10) -> int | None:
        """Read again: what piled up, then the server's close frame (None: no close frame came,
        e.g. the connection was reset, or it is still open after `timeout_s`)."""
        ws = self.ws
        if ws is None or ws.transport is None:
            return None
        if not ws.closed.done():
            ws.transport.resume_reading()
            try:
                await asyncio.wait_for(asyncio.shield(ws.closed), timeout_s)
            except TimeoutError:
                ws.transport.close()
        return ws.close_code


async def server_counters(target: Target) -> dict[str, float]:
    """The server's `kairos_ws_dropped_total` (sockets closed 1013 for being too slow) and
    `kairos_ws_connections` (open sockets)."""
    conn = await RawHttp(target.url, target.token).open()
    try:
        _, body = await conn.request("GET", "/metrics")
    finally:
        conn.close()
    out = {}
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        if name in ("kairos_ws_dropped_total", "kairos_ws_connections"):
            out[name] = float(value)
    return out


async def measure(target: Target, sockets: int, sids: list[str], clients: int, switches: int,
                  concurrency: int, slow_max: int = 0) -> dict[str, Any]:
    """One size: connect `sockets` watchers, run `switches` switches, gather the figures. With
    `slow_max`, then the same again with one more watcher of the first session that never reads
    (see `slow_phase`)."""
    pids = serving_pids(target.pid) if target.pid else []
    rss0 = sum(rss_kb(p) for p in pids)
    fds0 = [socket_fds(p) for p in pids]
    assign = [sids[i % len(sids)] for i in range(sockets)]
    shares = [assign[i::clients] for i in range(clients)]
    procs = [await ClientProc.spawn(target, share, concurrency) for share in shares if share]
    driver = Driver()
    slow = SlowReader()
    sent: dict[tuple[str, int], int] = {}
    sent_slow: dict[tuple[str, int], int] = {}
    acks: list[float] = []
    timeouts = 0
    i = 0

    async def one_switch(into: dict[tuple[str, int], int] | None) -> None:
        nonlocal timeouts, i
        sid = sids[i % len(sids)]
        i += 1
        t0, version, t_ack = await driver.switch(sid)
        if into is not None:
            into[(sid, version)] = t0
            if into is sent:
                acks.append((t_ack - t0) / 1e6)
        oks = await asyncio.gather(*(c.call(op="wait", sid=sid, version=version, timeout_s=10)
                                     for c in procs))
        timeouts += sum(not o["ok"] for o in oks)
        await asyncio.sleep(0.01)  # a short quiet gap between switches

    slow_info: dict[str, Any] = {}
    try:
        cpu_connect0 = sum(process_cpu_s(p) for p in pids)
        conns = await asyncio.gather(*(c.call(op="connect", sids=c.sids) for c in procs))
        cpu_connect = sum(process_cpu_s(p) for p in pids) - cpu_connect0
        connect_s = (max(c["end_ns"] for c in conns) - min(c["start_ns"] for c in conns)) / 1e9
        connected = sum(c["connected"] for c in conns)
        failed = sum(c["failed"] for c in conns)
        per_connect = [t for c in conns for t in c["connect_ms"]]
        rss1 = sum(rss_kb(p) for p in pids)
        split = [socket_fds(p) - f for p, f in zip(pids, fds0, strict=True)]
        await driver.open(target, sids)
        for _ in range(3):  # warm-up
            await one_switch(None)
        await asyncio.gather(*(c.call(op="lag_reset") for c in procs))
        cpu0 = sum(process_cpu_s(p) for p in pids)
        for _ in range(switches):
            await one_switch(sent)
        cpu = sum(process_cpu_s(p) for p in pids) - cpu0
        if slow_max:
            slow_info = await slow_phase(target, slow, sids[0], switches, slow_max, one_switch, sent_slow,
                                         driver)
            await asyncio.gather(*(c.call(op="wait", sid=sids[0], version=slow_info["last_version"],
                                          timeout_s=30) for c in procs))
        reports = await asyncio.gather(*(c.call(op="report") for c in procs))
    finally:
        driver.close()
        if slow.ws is not None and slow.ws.transport is not None:
            slow.ws.transport.close()
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
    d = deliveries(reports, sent)
    lags = [max(r["lag_ms"], default=0.0) for r in reports]
    lag_p99 = [pct(r["lag_ms"], 0.99) for r in reports]
    out = {
        "sockets": sockets, "sessions": len(sids), "connected": connected, "connect_failed": failed,
        "connect_s": connect_s, "connect_p50_ms": pct(per_connect, 0.5),
        "connect_p99_ms": pct(per_connect, 0.99),
        "connect_cpu_us_per_socket": cpu_connect * 1e6 / max(1, connected),
        "p50_ms": pct(d["per_delivery"], 0.5), "p99_ms": pct(d["per_delivery"], 0.99),
        "max_ms": max(d["per_delivery"], default=float("nan")),
        "all_p50_ms": pct(d["all_served"], 0.5), "all_p99_ms": pct(d["all_served"], 0.99),
        "all_max_ms": max(d["all_served"], default=float("nan")),
        "missed": d["missed"], "wait_timeouts": timeouts, "closed_by_server": d["closed"],
        "switches": len(sent), "rss_before_mb": rss0 / 1024, "rss_after_mb": rss1 / 1024,
        "rss_kb_per_socket": (rss1 - rss0) / max(1, connected),
        "cpu_us_per_frame": cpu * 1e6 / max(1, len(d["per_delivery"])),
        "split": split, "client_lag_max_ms": lags, "client_lag_p99_ms": lag_p99,
        "load_avg": os.getloadavg()[0],
        "samples": {"delivery": d["per_delivery"], "all_served": d["all_served"], "connect": per_connect,
                    "ack": acks},
    }
    if slow_info:
        ds = deliveries(reports, sent_slow)
        out["slow"] = slow_info | {"p50_ms": pct(ds["per_delivery"], 0.5), "p99_ms": pct(ds["per_delivery"], 0.99),
                                   "max_ms": max(ds["per_delivery"], default=float("nan")),
                                   "all_p99_ms": pct(ds["all_served"], 0.99), "missed": ds["missed"]}
        out["missed"] += ds["missed"]
        out["samples"]["delivery_slow"] = ds["per_delivery"]
    return out


async def slow_phase(target: Target, slow: SlowReader, sid: str, switches: int, slow_max: int,
                     one_switch: Callable[[dict[tuple[str, int], int] | None], Awaitable[None]],
                     sent_slow: dict[tuple[str, int], int], driver: Driver) -> dict[str, Any]:
    """`switches` measured switches with `slow` (never reading) among the watchers of `sid`, then
    switches back to back (at most `slow_max`, 60 s) until the server closes it: 1013 when its
    unsent bytes pass the bound (counted by kairos_ws_dropped_total), or 1011 when it missed a
    heartbeat pong (it reads nothing, so it answers no ping either)."""
    before = await server_counters(target)
    pids = serving_pids(target.pid) if target.pid else []
    await slow.open(target, sid)
    assert slow.ws is not None and slow.ws.transport is not None
    client_port = slow.ws.transport.get_extra_info("sockname")[1]
    t0 = time.monotonic()
    for _ in range(switches):
        await one_switch(sent_slow)
    n, how, version = switches, "", 0
    while n < slow_max and time.monotonic() - t0 < 60:
        for _ in range(20):
            _, version, _ = await driver.switch(sid)
            n += 1
        now = await server_counters(target)
        if now.get("kairos_ws_dropped_total", 0) > before.get("kairos_ws_dropped_total", 0):
            how = "closed 1013 (unsent bytes over the bound)"
        elif now.get("kairos_ws_connections", 0) < before.get("kairos_ws_connections", 0) + 1:
            how = "closed, not for its unsent bytes: 1011 (heartbeat missed)"
        if how:
            break
    lingering = None
    if how and pids:  # closed as far as the server's counters go: does it still hold the socket?
        await asyncio.sleep(3)
        lingering = holds_connection_from(pids, client_port)
    return {"switches": n, "seconds": time.monotonic() - t0, "server_close": how or "still open",
            "client_close_code": await slow.close_code(), "last_version": version,
            "server_fd_lingers": lingering}


def deliveries(reports: list[dict[str, Any]], sent: dict[tuple[str, int], int]) -> dict[str, Any]:
    """Per delivery and per switch (the slowest socket) times in ms of the switches in `sent`,
    from the client processes' reports; missed versions; sockets the server closed."""
    per_delivery: list[float] = []
    slowest: dict[tuple[str, int], float] = {}
    by_session: dict[str, list[tuple[int, int]]] = {}
    for (s, v), t0 in sent.items():
        by_session.setdefault(s, []).append((v, t0))
    missed = closed = 0
    for rep in reports:
        for sid, seen, close_code in rep["sockets"]:
            closed += close_code is not None
            for v, t0 in by_session.get(sid, ()):
                arrival = seen.get(str(v))
                if arrival is None:
                    missed += 1
                    continue
                ms = (arrival - t0) / 1e6
                per_delivery.append(ms)
                slowest[(sid, v)] = max(slowest.get((sid, v), 0.0), ms)
    return {"per_delivery": per_delivery, "all_served": list(slowest.values()), "missed": missed,
            "closed": closed}


def report_lines(r: dict[str, Any]) -> list[str]:
    """The human-readable summary of one size, with the issue's targets."""
    target = TARGET_P99_MS.get(r["sockets"])
    verdict = "" if target is None else f" (target p99 <= {target} ms: {'OK' if r['p99_ms'] <= target else 'MISS'})"
    ctarget = TARGET_CONNECT_S.get(r["sockets"])
    cverdict = "" if ctarget is None else f" (target <= {ctarget} s: {'OK' if r['connect_s'] <= ctarget else 'MISS'})"
    return [
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
        + " ms, p99 " + " / ".join(f"{x:.1f}" for x in r["client_lag_p99_ms"]) + " ms"
        + f"  (load average {r['load_avg']:.2f})",
        *slow_lines(r),
    ]


def slow_lines(r: dict[str, Any]) -> list[str]:
    """The slow-reader phase next to the run without it."""
    s = r.get("slow")
    if not s:
        return []
    code = s["client_close_code"]
    verdict = "OK" if "1013" in s["server_close"] else "MISS"
    return [f"  with one socket that never reads ({r['switches']} measured switches): others' "
            f"delivery p50 {s['p50_ms']:.1f}  p99 {s['p99_ms']:.1f}  max {s['max_ms']:.1f} ms "
            f"(without: {r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f}); all served p99 "
            f"{s['all_p99_ms']:.1f} ms; missed {s['missed']}",
            f"  slow socket, after {s['switches']} switches in {s['seconds']:.1f} s: server: "
            f"{s['server_close']}; the client saw close code {code} (None: reset, the close frame "
            f"could not get out) (expected 1013: {verdict}); 3 s after that the server "
            + {None: "was not checked", True: "STILL HELD its connection (a descriptor on it)",
               False: "held no descriptor on its connection"}[s["server_fd_lingers"]]]


def record(report: Report, r: dict[str, Any]) -> None:
    """Put one size's figures on the report (the switch's own answer is the baseline)."""
    n, smp = r["sockets"], r["samples"]
    report.latency(f"{n}.ack", smp["ack"], f"{n} watchers: SWITCH -> ACK on the driver (baseline)")
    report.latency(f"{n}.delivery", smp["delivery"], f"{n} watchers: SWITCH -> each STATE_UPDATE",
                   baseline=f"{n}.ack")
    report.latency(f"{n}.all_served", smp["all_served"], f"{n} watchers: SWITCH -> the last one",
                   baseline=f"{n}.ack")
    report.latency(f"{n}.connect", smp["connect"], f"{n} watchers: connect -> CONNECTED")
    report.value(f"{n}.missed", r["missed"], "", f"{n} watchers: versions missed")
    report.value(f"{n}.connect_s", r["connect_s"], "s", f"{n} watchers: all connected")
    report.value(f"{n}.connect_cpu_us", r["connect_cpu_us_per_socket"], "us", f"{n} watchers: server CPU per connect")
    report.value(f"{n}.cpu_us_per_frame", r["cpu_us_per_frame"], "us", f"{n} watchers: server CPU per frame",
                 baseline="send_floor_us")
    report.value(f"{n}.rss_kb_per_socket", r["rss_kb_per_socket"], "KB", f"{n} watchers: server RSS per socket")
    report.value(f"{n}.client_lag_max_ms", max(r["client_lag_max_ms"], default=0.0), "ms",
                 f"{n} watchers: worst client-process loop lag")
    if "slow" in r:
        report.latency(f"{n}.delivery_slow", smp["delivery_slow"],
                       f"{n} watchers: each STATE_UPDATE, one socket not reading", baseline=f"{n}.delivery")
        report.value(f"{n}.slow_dropped_1013", float("1013" in r["slow"]["server_close"]), "",
                     f"{n} watchers: socket not reading dropped with 1013 (1) or not (0)")
    for line in report_lines(r):
        report.note(line)


_FLOOR_READER = """
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
for _ in range(n):
    sel.register(socket.create_connection(("127.0.0.1", port)), selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if not key.fileobj.recv(65536):
            sys.exit(0)
"""


def send_floor_us(n: int, readers: int, frame_size: int = 260, passes: int = 9) -> tuple[float, float, int]:
    """This process's CPU per bare `send()` of one small frame to each of `n` loopback TCP
    sockets, read by `readers` processes waiting in epoll, as the bench's clients do (on loopback
    a send also does the receiver's TCP work and wakes it): the least a server can spend per
    delivered frame on this machine, whatever its language. Returns the medians over `passes` of
    (us per send, ms per pass over all sockets) and the sockets used (capped by the file limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = max(readers, min(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200))
    frame = b"\x81\x7e" + (frame_size - 4).to_bytes(2, "big") + b"x" * (frame_size - 4)
    senders: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=4096) as server:
        port = str(server.getsockname()[1])
        procs = [subprocess.Popen([sys.executable, "-c", _FLOOR_READER, port, str(n // readers + (i < n % readers))],
                                  stdout=subprocess.PIPE, text=True) for i in range(readers)]
        try:
            while len(senders) < n:
                sender, _addr = server.accept()
                sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                senders.append(sender)
            for proc in procs:
                assert proc.stdout is not None
                proc.stdout.readline()
            cpu, wall = [], []
            for _ in range(passes):
                c0, t0 = time.process_time(), time.perf_counter()
                for sender in senders:
                    sender.send(frame)
                cpu.append((time.process_time() - c0) / n * 1e6)
                wall.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.05)  # the readers take it all in
            return sorted(cpu)[passes // 2], sorted(wall)[passes // 2], n
        finally:
            for s in senders:
                s.close()
            for proc in procs:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def _run(args: argparse.Namespace, target: Target, report: Report) -> None:
    floor, floor_ms, floor_n = send_floor_us(max(int(x) for x in str(args.sockets).split(",")), args.clients)
    report.value("send_floor_us", floor, "us", f"raw send() of one frame, {floor_n} loopback sockets (floor)")
    report.value("send_floor_pass_ms", floor_ms, "ms", f"raw send() to all {floor_n} sockets, one pass (floor)")
    sids = await make_sessions(target, args.sessions)
    for n in [int(x) for x in str(args.sockets).split(",")]:
        report.step(f"{n} watchers over {len(sids)} session(s), {args.clients} client processes")
        r = await measure(target, n, sids, args.clients, args.switches, args.concurrency,
                          args.slow_max_switches if args.slow_reader else 0)
        record(report, r)
        if r["missed"] or r["connect_failed"]:
            raise BenchError(f"{n} watchers: {r['missed']} versions missed, {r['connect_failed']} "
                             "sockets failed to connect")
        if target.pid:  # let the server see the closed sockets before the next size
            pids = serving_pids(target.pid)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(socket_fds(p) for p in pids) > 50 * len(pids):  # noqa: ASYNC110
                await asyncio.sleep(0.1)


def run(args: argparse.Namespace, report: Report) -> None:
    """Measure every size against the target."""
    _use_uvloop()
    env = {} if args.send_queue is None else {"KAIROS_WS_SEND_QUEUE": str(args.send_queue)}
    with kairos(args, report, **env) as target:
        asyncio.run(_run(args, target, report))


def _use_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


if __name__ == "__main__" and sys.argv[1:2] == ["--client"]:  # a client process (see ClientProc)
    _, _, _host, _port, _auth, _concurrency = sys.argv
    _use_uvloop()
    asyncio.run(_client(_host, int(_port), _auth, int(_concurrency)))
