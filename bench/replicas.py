"""`python -m bench replicas`: what KAIROS_REDIS_MIN_REPLICAS_ACK=1 costs a fenced write.

Starts its own master and one replica (loopback) and measures, taking turns in one run so the
machine's load hits every variant alike: a PING round trip (the baseline), the fenced write as
today (one EVALSHA, publishing inside), EVALSHA + WAIT pipelined (one round trip), EVALSHA then
WAIT (two round trips, what pipelining saves), and the full replicated write of `Scripts` (EVALSHA
+ WAIT, then the PUBLISH of what replicas confirmed). Prints p50/p99 and ratios to PING.
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
from tests.redis_topology import Replicated


def _pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def _run(n: int) -> None:
    import redis.asyncio as aioredis

    with Replicated(Path(tempfile.mkdtemp(prefix="kairos-bench-replicas-")), replicas=1) as topo:
        client = aioredis.Redis.from_url(topo.master_url)
        keys = Keys(f"bench-replicas:{uuid.uuid4().hex[:8]}:")
        plain, replicated = Scripts(client, keys), Scripts(client, keys, min_replicas_ack=1)
        inc = uuid.uuid4().hex
        await plain.do_join(inc, b"{}", 600_000)
        sid = str(uuid.uuid4())
        epoch = int((await plain.do_claim_or_forward(inc, sid, may_claim=True))[1])
        checkpoint, message = b"c" * 300, b"m" * 400  # about a two-player session's sizes
        argv = plain.fenced_write_argv(inc, epoch, sid, checkpoint, message, None)
        sha = plain._write.sha
        await plain.do_fenced_write_argv(argv)  # loads the script

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
            "PING (baseline)": ping,
            "fenced write, MIN_REPLICAS_ACK=0": write,
            "EVALSHA + WAIT pipelined": write_wait_pipelined,
            "EVALSHA, then WAIT": write_then_wait,
            "fenced write, MIN_REPLICAS_ACK=1": replicated_write,
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(n + n // 10):
            for name, fn in variants.items():
                t = time.perf_counter()
                await fn()
                if i >= n // 10:  # warm-up rounds are not counted
                    samples[name].append(time.perf_counter() - t)
        await plain.do_leave(inc)
        await client.aclose()
    base = _pct(samples["PING (baseline)"], 50)
    for name, s in samples.items():
        print(f"{name:<36} p50 {_pct(s, 50) * 1e6:7.0f} us  p99 {_pct(s, 99) * 1e6:7.0f} us  "
              f"p50 = {_pct(s, 50) / base:4.2f}x PING")


def main(argv: list[str]) -> None:
    """Entry point of `python -m bench replicas`."""
    parser = argparse.ArgumentParser(prog="python -m bench replicas", description=__doc__)
    parser.add_argument("-n", type=int, default=3000, help="rounds (each variant once per round)")
    args: Any = parser.parse_args(argv)
    anyio.run(_run, args.n)
