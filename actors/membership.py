"""Membership: this process's incarnation, its liveness key, renewal, and the live-instance list.

The liveness key (TTL `lease_ttl_ms`) is what every lease of this incarnation hangs on: renewal
every TTL/5 uses SET XX, which fails once the key has expired instead of recreating it. A failed
renewal means other instances may already own our sessions: `on_lost` stops every local actor
without acknowledging anything more, then we rejoin under a fresh incarnation.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from actors.keys import Scripts

log = logging.getLogger(__name__)

# Renewal after a failure: attempts this far apart, each given at most _MAX_ATTEMPT_S (a frozen
# Redis or a client retrying with backoff must not hold the next attempt back).
_RETRY_S = 0.05
_MAX_ATTEMPT_S = 0.5


def new_incarnation() -> str:
    """A fresh random incarnation id (never reused)."""
    return uuid.uuid4().hex


class Membership:
    """One incarnation at a time; `run()` renews it and replaces it when it lapses."""

    def __init__(
        self,
        scripts: Scripts,
        *,
        instance_id: str,
        ttl_ms: int,
        info: Callable[[], dict[str, Any]],
        on_lost: Callable[[str], Awaitable[None]],
    ) -> None:
        self.scripts = scripts
        self.instance_id = instance_id
        self.ttl_ms = ttl_ms
        self._info = info
        self._on_lost = on_lost
        self.incarnation = new_incarnation()
        # monotonic() before which our liveness key surely still exists (the renewal that set it
        # was sent no earlier than this minus TTL); monotonic time keeps counting through SIGSTOP.
        self._trusted_until = 0.0
        self._rejoining: anyio.Event | None = None

    def _payload(self) -> bytes:
        info = {"instance_id": self.instance_id, "incarnation": self.incarnation}
        info.update(self._info())
        return json.dumps(info).encode()

    def trusted(self) -> bool:
        """True while our liveness key cannot have expired yet (safe to answer from memory)."""
        return time.monotonic() < self._trusted_until

    async def join(self) -> None:
        """Create the liveness key for the current incarnation (a new one if it was taken)."""
        while True:
            sent = time.monotonic()
            if await self.scripts.do_join(self.incarnation, self._payload(), self.ttl_ms):
                self._trusted_until = sent + self.ttl_ms * 0.8 / 1000
                return
            self.incarnation = new_incarnation()

    async def renew(self) -> bool:
        """One renewal; False when the key had already expired (incarnation lost)."""
        sent = time.monotonic()
        ok = await self.scripts.do_renew(self.incarnation, self._payload(), self.ttl_ms)
        if ok:
            self._trusted_until = sent + self.ttl_ms * 0.8 / 1000
        return ok

    async def lost(self, incarnation: str) -> None:
        """Our incarnation `incarnation` is gone: stop its actors, rejoin as a new one (once).
        Returns once the new incarnation is live (callers who noticed too just wait for that)."""
        if self._rejoining is not None:
            await self._rejoining.wait()
            return
        if incarnation != self.incarnation:
            return  # someone already handled this loss
        self._rejoining = rejoined = anyio.Event()
        try:
            self._trusted_until = 0.0
            old = self.incarnation
            self.incarnation = new_incarnation()
            log.warning("liveness lost: incarnation %s, rejoining as %s", old, self.incarnation)
            await self._on_lost(old)
            while True:
                try:
                    await self.join()
                    return
                except Exception as e:  # Redis down: keep trying, we own nothing meanwhile
                    log.warning("rejoin failed: %r", e)
                    await anyio.sleep(self.ttl_ms / 5 / 1000)
        finally:
            self._rejoining = None
            rejoined.set()

    async def run(self) -> None:
        """Renew every TTL/5 until cancelled; on a lapse, hand over to `lost()`.

        A failed attempt is retried every 50 ms (each attempt bounded to TTL/10, at most 0.5 s),
        not a period later and not at the pace of the Redis client's own retry backoff: Redis
        coming back is noticed within ~TTL/10, so an outage shorter than TTL - 2 x TTL/5 (in fact
        up to about TTL - TTL/5 - TTL/10) never costs the liveness, and with it a mass failover."""
        period = self.ttl_ms / 5 / 1000
        attempt = min(period / 2, _MAX_ATTEMPT_S)
        wait, failures = period, 0
        while True:
            await anyio.sleep(wait)
            inc = self.incarnation
            try:
                with anyio.fail_after(attempt):
                    ok = await self.renew()
            except Exception as e:  # Redis unreachable: keep trying; the TTL decides, not us
                if failures == 0:
                    log.warning("liveness renewal failed, retrying every %.0f ms: %r", _RETRY_S * 1000, e)
                failures += 1
                wait = min(_RETRY_S, period)
                continue
            if failures:
                log.warning("liveness renewed again after %d failed attempts", failures)
            wait, failures = period, 0
            if not ok:
                await self.lost(inc)

    async def leave(self) -> None:
        """Clean shutdown: delete our liveness key so our leases are claimable at once."""
        self._trusted_until = 0.0
        await self.scripts.do_leave(self.incarnation)

    async def instances(self) -> list[dict[str, Any]]:
        """Live instances: instance_id, incarnation, draining, actors."""
        return [json.loads(raw) for raw in await self.scripts.do_list_instances()]
