"""What KAIROS_REDIS_MIN_REPLICAS_ACK=1 costs a fenced write (`python -m bench replicas`).

Starts its own master and one replica (loopback) and measures, taking turns in one run so the
machine's load hits every variant alike: a PING round trip (the baseline), the fenced write as
today (one EVALSHA, publishing inside), EVALSHA + WAIT pipelined (one round trip), EVALSHA then
WAIT (two round trips, what pipelining saves), and the full replicated write of `Scripts` (EVALSHA
+ WAIT, then the PUBLISH of what replicas confirmed), each as a ratio to PING.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from actors.keys import REPLICA_WAIT_MS, Keys, Scripts
from bench.redis_topology import Replicated
from bench.report import BenchError, Report

QUICK: dict[str, Any] = {"rounds": 200}


async def _measure(rounds: int, report: Report) -> dict[str, list[float]]:
    """Per round, each variant once (µs)."""
    import redis.asyncio as aioredis

    with Replicated(Path(tempfile.mkdtemp(prefix="kairos-bench-replicas-")), replicas=1) as topo:
        report.step(f"master :{topo.master.port if topo.master else '?'} + 1 replica up; {rounds} rounds")
        client = aioredis.Redis.from_url(topo.master_url)
        keys = Keys(f"bench-replicas:{uuid.uuid4().hex[:8]}:")
        plain, replicated = Scripts(client, keys), Scripts(client, keys, min_replicas_ack=1)
        inc = uuid.uuid4().hex
        await plain.do_join(inc, b"{}", 600_000)
        sid = str(uuid.uuid4())
        epoch = int((await plain.do_claim_or_forward(inc, sid, may_claim=True))[1])
        checkpoint, message = b"c" * 300, b"m" * 400  # about a two-player session's sizes
        # no version: the same write is repeated, each time a full write
        argv = plain.fenced_write_argv(inc, epoch, sid, checkpoint, message, None)
        await plain.do_fenced_write_argv(argv)  # loads the script
        sha = plain._write.sha

        async def ping() -> None:
            await client.ping()

        async def write() -> None:
            await plain.do_fenced_write_argv(argv)

        async def write_wait_pipelined() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(sha, 5, *argv)
            pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
            await pipe.execute()

        async def write_then_wait() -> None:
            await client.evalsha(sha, 5, *argv)
            await client.execute_command("WAIT", 1, REPLICA_WAIT_MS)

        async def replicated_write() -> None:
            await replicated.do_fenced_write_argv(argv)

        variants: dict[str, Callable[[], Awaitable[None]]] = {
            "ping": ping, "write": write, "write_wait": write_wait_pipelined,
            "write_then_wait": write_then_wait, "replicated_write": replicated_write,
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(rounds + rounds // 10):
            for name, fn in variants.items():
                t = time.perf_counter()
                await fn()
                if i >= rounds // 10:  # warm-up rounds are not counted
                    samples[name].append((time.perf_counter() - t) * 1e6)
        await plain.do_leave(inc)
        await client.aclose()
    return samples


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench replicas`."""
    p.add_argument("--rounds", type=int, default=3000, help="rounds (each variant once per round)")


def run(args: argparse.Namespace, report: Report) -> None:
    """Latencies (µs) of each variant next to the PING baseline of the same rounds."""
    if args.rounds < 1:
        raise BenchError("--rounds must be positive")
    m = anyio.run(_measure, args.rounds, report)
    report.latency("ping", m["ping"], "PING round trip (baseline)", unit="us")
    for name, label in (("write", "fenced write, MIN_REPLICAS_ACK=0 (one EVALSHA)"),
                        ("write_wait", "EVALSHA + WAIT 1, pipelined (one round trip)"),
                        ("write_then_wait", "EVALSHA, then WAIT 1 (two round trips)"),
                        ("replicated_write", "fenced write, MIN_REPLICAS_ACK=1 (+ publish after WAIT)")):
        report.latency(name, m[name], label, unit="us", baseline="ping")
