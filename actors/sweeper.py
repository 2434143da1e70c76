"""Orphan adoption: running sessions whose owner died (or passivated them) still expire on time.

Every host sweeps the sorted sets of next deadlines (one per partition) every ~TTL/4 (jittered,
so N instances do not sweep in lock-step) and adopts, in one script call per partition (on a
cluster: a few, see docs/scaling.md), up to `batch` sessions due within the horizon whose lease is
released or whose owner's liveness key is gone. The adopted actor arms its timer
at the session's deadline like any other, so a flag falls within about one TTL of its time.
Sessions due soon whose lease names this host but which have no actor here (it closed on a failed
write) are re-activated the same way, so their deadline is applied once Redis answers again.
"""

from __future__ import annotations

import gc
import logging
import random
from typing import TYPE_CHECKING

import anyio

from actors.actor import Lease

if TYPE_CHECKING:
    from actors.host import Host

log = logging.getLogger(__name__)


class Sweeper:
    """Adopts orphaned running sessions for one host."""

    def __init__(self, host: Host, *, period_ms: int, horizon_ms: int, scan: int = 1000, batch: int = 200) -> None:
        self.host = host
        self.period_s = period_ms / 1000
        self.horizon_ms = horizon_ms
        self.scan = scan
        self.batch = batch
        self.adopted = 0  # total, for metrics and tests
        self._offsets = [0] * host.keys.partitions

    async def sweep_once(self) -> int:
        """One pass over every partition; returns how many sessions were adopted (the most of
        one partition: a full batch there sweeps again at once)."""
        most, failed = 0, None
        for partition in range(len(self._offsets)):
            try:
                most = max(most, await self._sweep_partition(partition))
            except Exception as e:  # one partition's master away (a cluster failover): sweep the others
                failed = failed or e
        if failed is not None:
            raise failed
        return most

    async def _sweep_partition(self, partition: int) -> int:
        host = self.host
        if not host.claiming:
            return 0
        inc = host.membership.incarnation
        answer = await host.scripts.do_adopt_orphans(
            inc, until_ms=host.clock() + self.horizon_ms, scan=self.scan, batch=self.batch,
            offset=self._offsets[partition], partition=partition)
        if answer is None:
            await host.membership.lost(inc)
            return 0
        checked, fetched, found, mine = answer
        # Many sessions due soon (mostly owned by live instances): page through them over sweeps;
        # back to the start once the end of the due entries was reached.
        reached_end = fetched < self.scan and checked == fetched
        self._offsets[partition] = 0 if reached_end else self._offsets[partition] + checked
        for sid, epoch, checkpoint, reason in found:
            host.activate(sid, Lease(inc, epoch), checkpoint, reason)
        if found:
            self.adopted += len(found)
            log.info("adopted %d orphaned sessions", len(found))
            gc.freeze()  # bulk activation: keep the new long-lived objects out of young GCs
        # Leases naming us with no actor here: its write failed (Redis away, a timeout, a bug) and
        # it closed, or a claim's answer was lost. Nobody else may adopt them while we live.
        revived = 0
        for sid in mine:
            if not host.is_local(sid) and await host.router.activate_here(sid, "self"):
                revived += 1
        if revived:
            log.warning("re-activated %d sessions of ours that had no actor", revived)
        return len(found)

    async def run(self) -> None:
        """Sweep forever (until cancelled); a full batch sweeps again at once."""
        while True:
            await anyio.sleep(self.period_s * random.uniform(0.5, 1.5))
            try:
                adopted = await self.sweep_once()
                while adopted >= self.batch:
                    adopted = await self.sweep_once()
            except Exception as e:  # Redis unreachable: try again next period
                log.warning("sweep failed: %r", e)
