"""One time base for the cluster: this instance's clock, corrected to Redis `TIME`.

Every instance charges time with `now_ms()`; if each used its own wall clock, a skew between two
instances would move time from one player to another across a failover or a drain. So each
instance measures its offset to the Redis server's clock, NTP-style: several `TIME` round trips,
keeping the one with the lowest delay (its error is at most half that delay), refreshed every few
seconds. The local clock it corrects advances with `time.monotonic_ns()` (a wall-clock step
between two measurements moves nothing); the offset absorbs where the wall clock stood at start.

On a Redis Cluster every node has its own clock (its machine's): every instance measures against
the same one, the master of the slot of the deployment's `layout` key (`time_source`).

Until a measurement within `max_error_ms` exists, `synced()` is False: the instance is not ready
and claims no session. The error of a kept measurement grows with its age (drift allowance), so
an instance that cannot measure for minutes stops claiming too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from actors.connection import is_cluster
from actors.keys import Keys
from actors.metrics import CLOCK_ERROR, CLOCK_OFFSET

log = logging.getLogger(__name__)

# How fast two free-running quartz clocks may drift apart (200 ppm is a generous bound).
DRIFT_PER_MS = 200e-6


def local_ns() -> int:
    """This host's clock in epoch nanoseconds, advancing monotonically from the wall clock at start."""
    return time.monotonic_ns() + _ANCHOR_NS


_ANCHOR_NS = time.time_ns() - time.monotonic_ns()


def time_source(redis: Any, key_prefix: str) -> Any:
    """What `ClusterClock.measure` asks `time()` of: `redis` itself, or on a Redis Cluster the
    master of one agreed slot (a cluster client sends TIME to a node of its own choosing)."""
    if not is_cluster(redis):
        return redis
    return _NodeTime(redis, Keys(key_prefix).layout)


class _NodeTime:
    def __init__(self, redis: Any, key: str) -> None:
        self.redis, self.key = redis, key

    async def time(self) -> Any:
        await self.redis.initialize()  # the slot map (a no-op once loaded)
        return await self.redis.time(target_nodes=self.redis.get_node_from_key(self.key))


class ClusterClock:
    """`now_ms()` in the cluster's time base (Redis `TIME`); `synced()` says whether to trust it.

    `local` is this host's clock in ns (a test may skew it); `run(redis)` keeps the offset fresh."""

    def __init__(self, *, local: Callable[[], int] = local_ns, samples: int = 5, refresh_s: float = 5.0,
                 max_error_ms: float = 20.0) -> None:
        self.local = local
        self.samples = samples
        self.refresh_s = refresh_s
        self.max_error_ms = max_error_ms
        self.offset_ns: int | None = None  # Redis TIME minus `local`, from the best measurement
        self._error_ns = 0  # that measurement's half round trip
        self._measured_at_ns = 0  # `local` when it was taken

    def now_ms(self) -> int:
        """Cluster time in epoch ms (the local clock as is until the first measurement)."""
        return (self.local() + (self.offset_ns or 0)) // 1_000_000

    __call__ = now_ms

    def error_ms(self) -> float:
        """Bound on |now_ms() - Redis TIME|: half the kept round trip plus drift since (inf if unknown)."""
        if self.offset_ns is None:
            return float("inf")
        age = self.local() - self._measured_at_ns
        return (self._error_ns + DRIFT_PER_MS * max(0, age)) / 1e6

    def synced(self) -> bool:
        """True once the offset is known within `max_error_ms` (claiming sessions is allowed)."""
        return self.error_ms() <= self.max_error_ms

    async def measure(self, redis: Any) -> None:
        """Take `samples` TIME round trips and keep the lowest-delay one if it beats the current
        measurement (aged by the drift allowance)."""
        best: tuple[int, int, int] | None = None  # (half round trip, offset, local at reply)
        for _ in range(self.samples):
            sent = self.local()
            seconds, micros = await redis.time()
            received = self.local()
            half = max(0, received - sent) // 2
            offset = (int(seconds) * 1_000_000 + int(micros)) * 1000 - (sent + half)
            if best is None or half < best[0]:
                best = (half, offset, received)
        assert best is not None
        half, offset, at = best
        if half / 1e6 <= self.error_ms():
            self.offset_ns, self._error_ns, self._measured_at_ns = offset, half, at
        CLOCK_OFFSET.set(self.offset_ns / 1e9 if self.offset_ns is not None else 0)
        CLOCK_ERROR.set(self.error_ms() / 1000)

    async def run(self, redis: Any) -> None:
        """Measure every `refresh_s` until cancelled (a failed measurement is logged, retried)."""
        while True:
            try:
                await self.measure(redis)
            except Exception as e:  # Redis unreachable: keep the last offset; its error grows
                log.warning("clock measurement failed: %r", e)
            await anyio.sleep(self.refresh_s)
