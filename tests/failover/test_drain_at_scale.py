"""Drain and stop of a host with 10,000 live actors (issue 9): the work goes in bounded batches, so
the event loop keeps serving renewal, the inbox and timers; the drain timeout is honoured.

The draining host runs in this process (its loop is watched by `LoopLag`); the receiving instance
is a real `kairos serve` process, so its activations do not load the loop measured. The loop's
stalls are counted in CPU time of this process: on a shared machine the wall-clock lag also
counts the turns of every other process."""

from __future__ import annotations

import time

import anyio
import pytest
import redis.asyncio as aioredis

from actors.host import _DRAIN_BATCH, Host
from bench.failover import LoopLag, populated
from tests.servers import KairosServer, server_env

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

ACTORS = 10_000
TTL_MS = 2000  # renewals every 400 ms: a stall of half of that is already a risk to the liveness
CUT_S = 0.3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_drain_of_10k_actors_honours_its_timeout_keeps_the_loop_responsive_and_hands_every_lease_off(
        redis_url: str, database_url: str, key_prefix: str) -> None:
    env = server_env(redis_url, database_url, key_prefix, KAIROS_LEASE_TTL_MS=str(TTL_MS))
    client = aioredis.Redis.from_url(redis_url)
    lag = LoopLag()
    with KairosServer(env) as receiver:
        receiver.wait_ready()
        try:
            async with anyio.create_task_group() as tg:
                async with Host(client, key_prefix=key_prefix, lease_ttl_ms=TTL_MS, switch_rate_per_s=0) as h:
                    incarnation = h.incarnation
                    sids = await populated(h, ACTORS)
                    tg.start_soon(lag.run)
                    started = time.monotonic()
                    at_cut: list[float] = []
                    with anyio.CancelScope() as drain_scope:  # cut as KAIROS_DRAIN_TIMEOUT_S does

                        async def cut_drain() -> None:
                            await anyio.sleep(CUT_S)
                            at_cut.extend([time.monotonic(), h.actor_count()])
                            drain_scope.cancel()

                        tg.start_soon(cut_drain)
                        await h.drain()
                    returned = time.monotonic() - at_cut[0]
                    left_at_cut = h.actor_count()
                    with anyio.fail_after(120):
                        await h.drain()  # the rest
                    took = time.monotonic() - started
                    assert h.actor_count() == 0
                    assert h.incarnation == incarnation  # renewal kept up: the liveness never lapsed
                    owners = {(await h.scripts.do_read_lease(sid))[0] for sid in sids[::50]}
                    stopping = time.monotonic()
                stopped = time.monotonic() - stopping
                tg.cancel_scope.cancel()
        finally:
            await client.aclose()
    print(f"drain cut at {CUT_S} s, returned {returned:.2f} s later with {left_at_cut} of {ACTORS} actors left "
          f"({at_cut[1]:.0f} at the cut), all handed off after "
          f"{took:.2f} s, stop {stopped:.2f} s; worst loop lag {lag.worst * 1000:.0f} ms "
          f"({lag.worst_cpu * 1000:.0f} ms of it CPU in this process)")
    # the cut stops the drain: only the batch in flight finishes its hand-offs (a round trip
    # each, in parallel), nothing more is started
    assert left_at_cut > 0 and at_cut[1] - left_at_cut <= _DRAIN_BATCH, (at_cut, left_at_cut)
    assert returned < 2, returned
    assert incarnation not in owners and "" not in owners  # handed to the receiver, none kept or dropped
    assert stopped < 1.0, stopped
    assert lag.worst_cpu < TTL_MS / 5 / 2 / 1000, lag.worst_cpu
