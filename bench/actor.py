"""The actor hot path against a real Redis (no HTTP): local and forwarded `ask` vs a raw script call.

Measures, in one run: the raw EVALSHA round trip of the fenced write script (p50/p99), `ask()` on
a local actor (sequential, and 64 sessions concurrently), a forwarded `ask()` (another host owns
the session), and Redis commands per local command (counted client-side). The ratios are also
measured with raw writes and asks taking turns: on a shared machine that is the fair comparison.
Targets (issue 3): local p50 <= 1.5x raw p50; forwarded p50 <= 4x raw p50; 1 round trip/command.

With --masters 1,2,3: one host per Redis size started here (1 master: a standalone server; more:
a Redis Cluster), each with 64 running sessions: sequential local asks, then 64 sessions asking
concurrently, the sizes taking turns over --rounds; asks/s in total and per master, and the
ratio to the first size.
"""

from __future__ import annotations

import argparse
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import anyio

from actors.actor import Lease
from actors.host import Host
from actors.keys import Keys, Scripts
from bench.report import BenchError, Report
from bench.servers import stores
from bench.stats import quantile
from bench.target import add_masters_argument, add_store_arguments, masters_sizes
from kairos import codec, rules, wire
from kairos.commands import Create, ParticipantSpec, Start, Switch


def _create(sid: str, participants: int = 2) -> Create:
    ps = tuple(ParticipantSpec(str(uuid.uuid4()), 3_600_000) for _ in range(participants))
    return Create(session_id=sid, sync_mode="per_participant", participants=ps, owner="bench")


class _CommandCounter:
    """Counts commands a client sends (client side: exact even when others share the Redis)."""

    def __init__(self, redis: Any) -> None:
        self.calls: dict[str, int] = {}
        original = redis.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            name = str(args[0]).lower()
            self.calls[name] = self.calls.get(name, 0) + 1
            return await original(*args, **kwargs)

        redis.execute_command = counted


async def _raw_writer(redis: Any, prefix: str) -> tuple[Callable[[], Awaitable[float]], Scripts, str]:
    """A timed EVALSHA of the fenced write with a realistic checkpoint and update message (on a
    session of its own); also the scripts and incarnation, to leave when done."""
    scripts = Scripts(redis, Keys(prefix))
    inc = uuid.uuid4().hex
    await scripts.do_join(inc, b"{}", 600_000)
    sid = str(uuid.uuid4())
    r = await scripts.do_claim_or_forward(inc, sid, may_claim=True)
    lease = Lease(inc, int(r[1]))
    now = int(time.time() * 1000)
    state = rules.apply(rules.apply(None, _create(sid), now).state, Start(), now).state
    result = rules.apply(state, Switch(), now + 1)
    cp = codec.encode(result.state)
    msg = wire.update_message(result.state, result.events, now + 1, sid)
    deadline = rules.next_deadline(result.state)

    versions = itertools.count(1)  # the next version each time: the script's full path, as an actor's write

    async def one() -> float:
        t = time.perf_counter()
        await scripts.do_fenced_write(lease.incarnation, lease.epoch, sid, cp, msg, deadline, version=next(versions))
        return time.perf_counter() - t

    return one, scripts, inc


async def _raw_script(redis: Any, prefix: str, n: int) -> list[float]:
    """`n` raw fenced writes in a row."""
    one, scripts, inc = await _raw_writer(redis, prefix)
    out = [await one() for _ in range(n)]
    await scripts.do_leave(inc)
    return out


async def _interleaved(raw: Callable[[], Awaitable[float]], ask: Callable[[], Awaitable[Any]],
                       n: int) -> tuple[list[float], list[float]]:
    """Raw write and `ask` taking turns, so both see the same load (the box is shared)."""
    raws, asks = [], []
    for _ in range(n):
        raws.append(await raw())
        t = time.perf_counter()
        await ask()
        asks.append(time.perf_counter() - t)
    return raws, asks


def _core_cpu(n: int) -> dict[str, float]:
    """Median CPU of the pure steps every local switch pays besides the round trip (seconds)."""
    sid = str(uuid.uuid4())
    now = int(time.time() * 1000)
    state = rules.apply(rules.apply(None, _create(sid), now).state, Start(), now).state
    out: dict[str, list[float]] = {"apply": [], "encode": [], "update_message": []}
    for i in range(n):
        t0 = time.perf_counter()
        result = rules.apply(state, Switch(), now + i)
        t1 = time.perf_counter()
        codec.encode(result.state)
        t2 = time.perf_counter()
        wire.update_message(result.state, result.events, now + i, sid)
        t3 = time.perf_counter()
        out["apply"].append(t1 - t0)
        out["encode"].append(t2 - t1)
        out["update_message"].append(t3 - t2)
    return {k: quantile(sorted(v), 0.5) for k, v in out.items()}


async def _run(args: argparse.Namespace, report: Report, url: str) -> None:
    import redis.asyncio as aioredis

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    n = args.n
    ra = aioredis.Redis.from_url(url)
    rb = aioredis.Redis.from_url(url)
    report.step(f"raw fenced writes: 2 x {n}")
    await _raw_script(ra, prefix, n)
    raw = await _raw_script(ra, prefix, n)  # second pass: warm
    report.latency("raw", _ms(raw), "raw EVALSHA fenced write (baseline)")

    async with Host(ra, key_prefix=prefix, switch_rate_per_s=0) as a, \
            Host(rb, key_prefix=prefix, switch_rate_per_s=0) as b:
        sid = str(uuid.uuid4())
        await a.ask(sid, _create(sid))
        await a.ask(sid, Start())
        for _ in range(200):  # warm up
            await a.ask(sid, Switch())

        report.step(f"local ask: {n} sequential")
        counter = _CommandCounter(ra)
        local = []
        for _ in range(n):
            t = time.perf_counter()
            await a.ask(sid, Switch())
            local.append(time.perf_counter() - t)
        report.latency("local", _ms(local), "local ask, sequential", baseline="raw")
        # everything the host sent meanwhile, background work (renewal, inbox poll, sweeps) included
        per_op = sum(counter.calls.values()) / n
        report.value("redis_calls_per_ask", per_op, "", "Redis round trips per local ask (target 1)")

        sids = [str(uuid.uuid4()) for _ in range(64)]
        for s in sids:
            await a.ask(s, _create(s))
            await a.ask(s, Start())
        conc: list[float] = []
        per_session = max(1, n // 64)

        async def loop(s: str) -> None:
            for _ in range(per_session):
                t = time.perf_counter()
                await a.ask(s, Switch())
                conc.append(time.perf_counter() - t)

        report.step("local ask: 64 sessions concurrently")
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for s in sids:
                tg.start_soon(loop, s)
        elapsed = time.perf_counter() - t0
        report.latency("local_concurrent", _ms(conc), "local ask, 64 sessions concurrent", baseline="raw")
        report.value("local_concurrent_per_s", len(conc) / elapsed, "/s", "local asks/s, 64 sessions")

        report.step("forwarded ask")
        for _ in range(100):
            await b.ask(sid, Switch())
        fwd = []
        for _ in range(max(200, n // 4)):
            t = time.perf_counter()
            await b.ask(sid, Switch())
            fwd.append(time.perf_counter() - t)
        report.latency("forwarded", _ms(fwd), "forwarded ask, sequential", baseline="raw")

        # The passes above run one after another; on a shared box the load moves in between.
        report.step("raw writes and asks taking turns")
        raw_one, raw_scripts, raw_inc = await _raw_writer(ra, prefix + "raw:")
        il_raw, il_local = await _interleaved(raw_one, lambda: a.ask(sid, Switch()), n)
        il_raw_f, il_fwd = await _interleaved(raw_one, lambda: b.ask(sid, Switch()), max(200, n // 4))
        await raw_scripts.do_leave(raw_inc)
        report.latency("raw_il", _ms(il_raw), "raw write, taking turns with local (baseline)")
        report.latency("local_il", _ms(il_local), "local ask, taking turns (target <= 1.5x)",
                       baseline="raw_il")
        report.latency("raw_il_f", _ms(il_raw_f), "raw write, taking turns with fwd (baseline)")
        report.latency("forwarded_il", _ms(il_fwd), "forwarded ask, taking turns (target <= 4x)",
                       baseline="raw_il_f")

    cpu = _core_cpu(n)
    for k, v in cpu.items():
        report.value(f"core_{k}_us", v * 1e6, "us", f"core CPU per switch: {k} (p50)")
    report.value("core_total_us", sum(cpu.values()) * 1e6, "us", "core CPU per switch: total")
    await ra.aclose()
    await rb.aclose()


def _ms(samples_s: list[float]) -> list[float]:
    return [x * 1000 for x in samples_s]


QUICK: dict[str, Any] = {"n": 300}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench actor`."""
    p.add_argument("-n", type=int, default=2000, help="samples per measurement")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (as the server does)")
    add_store_arguments(p)
    add_masters_argument(p)


def check_arguments(args: argparse.Namespace) -> None:
    """-n must be positive; --masters must name sizes."""
    if args.n < 1:
        raise BenchError("-n must be positive")
    masters_sizes(args)


async def _run_masters(args: argparse.Namespace, report: Report, urls: dict[int, str]) -> None:
    from actors.connection import open_redis

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    base = f"{next(iter(urls))}m"
    async with AsyncExitStack() as stack:
        hosts: dict[int, Host] = {}
        sids: dict[int, list[str]] = {}
        for n, url in urls.items():
            client = open_redis(url)
            stack.push_async_callback(client.aclose)
            hosts[n] = await stack.enter_async_context(Host(client, key_prefix=prefix, switch_rate_per_s=0))
            sids[n] = [str(uuid.uuid4()) for _ in range(64)]
            for s in sids[n]:
                await hosts[n].ask(s, _create(s))
                await hosts[n].ask(s, Start())
        for n, host in hosts.items():
            report.step(f"{n}m local ask: {args.n} sequential")
            for i in range(100):  # warm up
                await host.ask(sids[n][i % 64], Switch())
            seq = []
            for i in range(args.n):
                t = time.perf_counter()
                await host.ask(sids[n][i % 64], Switch())
                seq.append(time.perf_counter() - t)
            report.latency(f"{n}m_local", _ms(seq), f"{n}m local ask, sequential", baseline=f"{base}_local")
        conc: dict[int, list[float]] = {n: [] for n in urls}
        took = dict.fromkeys(urls, 0.0)
        per_session = max(1, args.n // 64 // args.rounds)

        async def loop(host: Host, s: str, out: list[float]) -> None:
            for _ in range(per_session):
                t = time.perf_counter()
                await host.ask(s, Switch())
                out.append(time.perf_counter() - t)

        for r in range(args.rounds):
            for n, host in hosts.items():
                report.step(f"{n}m local ask, round {r + 1}/{args.rounds}: 64 sessions concurrently")
                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for s in sids[n]:
                        tg.start_soon(loop, host, s, conc[n])
                took[n] += time.perf_counter() - t0
        for n in urls:
            report.latency(f"{n}m_local_concurrent", _ms(conc[n]), f"{n}m local ask, 64 sessions concurrent",
                           baseline=f"{n}m_local")
        report.per_master("asks_per_s", "local asks/s, 64 sessions", {n: len(conc[n]) / took[n] for n in urls}, base)


def run(args: argparse.Namespace, report: Report) -> None:
    """Measure against the Redis of --redis-url (or an embedded one), or of each --masters size."""
    check_arguments(args)
    if sizes := masters_sizes(args):
        from bench.redis_topology import masters_by_size

        with ExitStack() as stack:
            urls = masters_by_size(stack, sizes, report.step)
            report.redis_url = urls[sizes[0]]
            anyio.run(_run_masters, args, report, urls, backend="asyncio",
                      backend_options={"use_uvloop": args.uvloop})
        return
    with stores(args.redis_url, None, database=False) as (url, _):
        report.redis_url = url
        anyio.run(_run, args, report, url, backend="asyncio",
                  backend_options={"use_uvloop": args.uvloop})
