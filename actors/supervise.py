"""Background loops that outlive their own bugs.

A serving process runs its loops (renewal, inbox, timers, sweeper, outbox workers, heartbeat,
clock) in task groups entered one after another in the same task: an error escaping any of them
cancels the group and every scope entered after it, so the instance went on answering HTTP with
no inbox, renewal or timers (a zombie that no health check saw). Each loop is started through
`supervised` instead: an error it lets out is logged and the loop started again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

log = logging.getLogger(__name__)


async def supervised(run: Callable[[], Awaitable[None]], name: str, *, pause_s: float = 1.0) -> None:
    """Await `run()`; after an error it let out, log it and start it again `pause_s` later
    (returns when `run()` returns; cancellation goes through)."""
    while True:
        try:
            return await run()
        except Exception:
            log.exception("%s failed; starting it again", name)
            await anyio.sleep(pause_s)
