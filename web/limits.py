"""The general rate limit per caller (token `sub`, else client address) and client addresses.

Fixed one-minute windows counted in Redis for all instances together (one script call per
request, `shared`): N instances allow the limit once, not N times. Without Redis (tests of the
pieces, or while Redis is unreachable) each instance counts in its own memory. (The per-session
switch limit lives in the actor, which sees every switch.)
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kairos.errors import RateLimited

WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class Quota:
    """The state of one caller's window after a request, for the `RateLimit-*` headers."""

    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        """The `RateLimit-*` response headers."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
            "RateLimit-Policy": f"{self.limit};w={WINDOW_S}",
        }


# (caller key, window number, window length ms) -> requests counted in that window so far
SharedCount = Callable[[str, int, int], Awaitable[int]]


class GeneralLimiter:
    """`limit` requests per caller per minute; `limit == 0` disables it. `shared` counts in Redis
    for every instance (set once Redis is open: `actors.keys.Scripts.do_count_request`)."""

    def __init__(self, limit: int, clock: Callable[[], float], shared: SharedCount | None = None) -> None:
        self.limit = limit
        self.clock = clock
        self.shared = shared
        self._window = -1
        self._counts: dict[str, int] = {}

    async def hit(self, caller_key: str) -> Quota | None:
        """Count one request; returns the quota, or raises RateLimited (None when disabled)."""
        if self.limit <= 0:
            return None
        now = self.clock()
        window = int(now // WINDOW_S)
        count = await self._count(caller_key, window)
        reset = max(1, math.ceil((window + 1) * WINDOW_S - now))
        if count > self.limit:
            err = RateLimited("Too many requests, please slow down", retry_after=reset)
            err.quota = Quota(self.limit, 0, reset)  # type: ignore[attr-defined]
            raise err
        return Quota(self.limit, self.limit - count, reset)

    async def _count(self, caller_key: str, window: int) -> int:
        if self.shared is not None:
            try:
                return await self.shared(caller_key, window, WINDOW_S * 1000)
            except Exception:  # Redis unreachable: limit per instance rather than refuse or 500
                pass
        if window != self._window:
            # A new window makes every old count irrelevant: drop them all (bounded memory).
            self._window = window
            self._counts.clear()
        count = self._counts.get(caller_key, 0) + 1
        self._counts[caller_key] = count
        return count


class ClientAddress:
    """The client's address, believing `X-Forwarded-For` only when the peer is a trusted proxy."""

    def __init__(self, trusted_proxies: list[str]) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in trusted_proxies]

    def _trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def resolve(self, peer: str | None, forwarded_for: str | None) -> str:
        """Walk X-Forwarded-For from the right, skipping trusted proxies; first untrusted hop wins."""
        addr = peer or "unknown"
        if not self.networks or not forwarded_for or not self._trusted(addr):
            return addr
        for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
            addr = hop
            if not self._trusted(hop):
                break
        return addr
