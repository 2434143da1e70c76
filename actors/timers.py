"""One timer heap per host: wakes passive actors at their next deadline or idle time.

Actors hold no task while idle (a sleeping task per session costs ~5-7 KB and slows full GCs
tenfold at 100k sessions); instead each actor keeps at most one live entry here (`armed`), and
entries that were superseded by an earlier one are skipped when they surface (lazy deletion).

On asyncio the wake-up is a plain loop timer whose callback fires the due entries itself: no task
to resume through a cancel scope, so a deadline waits for one loop iteration instead of two
behind whatever request work is queued. Other backends (trio, in tests) run a sleeping task.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from typing import Protocol

import anyio

try:
    import sniffio
except ImportError:  # anyio then detects asyncio by its running loop, which works in callbacks too
    sniffio = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class Wakeable(Protocol):
    armed: int | None  # time (ms) of this object's live heap entry, None when not armed
    closed: bool

    def on_wake(self, now_ms: int) -> None: ...


class Timers:
    """A heap of (at_ms, seq, target); `run()` calls `target.on_wake(now)` once `clock() >= at`."""

    def __init__(self, clock: Callable[[], int], *, max_sleep_s: float = 1.0) -> None:
        self.clock = clock
        # Bounded sleeps so an injected clock that jumps is noticed even without `poke()`.
        self.max_sleep_s = max_sleep_s
        self._heap: list[tuple[int, int, Wakeable]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # set while run() drives loop timers
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf  # loop time the handle fires at
        self._context: contextvars.Context | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, target: Wakeable, at_ms: int) -> None:
        """Make sure `target` wakes no later than `at_ms` (a later existing entry is superseded)."""
        if target.armed is not None and target.armed <= at_ms:
            return
        target.armed = at_ms
        first = not self._heap or at_ms < self._heap[0][0]
        heapq.heappush(self._heap, (at_ms, next(self._seq), target))
        if first:
            if self._loop is not None:
                self._schedule()
            else:
                self._wake.set()

    def poke(self) -> None:
        """Re-check the heap now (e.g. after an injected clock moved)."""
        if self._loop is not None:
            self._schedule(now=True)
        else:
            self._wake.set()

    def fire_due(self) -> int:
        """Wake every target whose time has come; returns how many were woken."""
        heap, now, n = self._heap, self.clock(), 0
        while heap and heap[0][0] <= now:
            at, _, target = heapq.heappop(heap)
            if target.armed != at or target.closed:
                continue  # superseded or gone
            target.armed = None
            try:
                target.on_wake(now)
            except Exception:  # one broken target must not stop every other timer
                log.exception("timer target failed")
            n += 1
        return n

    async def run(self) -> None:
        """Fire due entries forever (until cancelled)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): a sleeping task below
            pass
        else:
            await self._run_on_loop_timers()
            return
        while True:
            self.fire_due()
            delay = (self._heap[0][0] - self.clock()) / 1000 if self._heap else math.inf
            if delay > 0:
                with anyio.move_on_after(min(delay, self.max_sleep_s)):
                    await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()

    async def _run_on_loop_timers(self) -> None:
        self._loop = asyncio.get_running_loop()
        # A loop callback has no current task, so anyio (via sniffio) would not know it runs on
        # asyncio and targets could not spawn their tasks: say so in the callbacks' context.
        self._context = contextvars.copy_context()
        if sniffio is not None:
            self._context.run(sniffio.current_async_library_cvar.set, "asyncio")
        try:
            self._schedule()
            await anyio.sleep_forever()
        finally:
            if self._handle is not None:
                self._handle.cancel()
            self._loop, self._handle, self._when = None, None, math.inf

    def _schedule(self, *, now: bool = False) -> None:
        """(Re)arm the loop timer for the earliest entry, at most `max_sleep_s` ahead."""
        loop = self._loop
        assert loop is not None
        if now:
            delay = 0.0
        else:
            delay = (self._heap[0][0] - self.clock()) / 1000 if self._heap else math.inf
            delay = max(0.0, min(delay, self.max_sleep_s))
        when = loop.time() + delay
        if self._handle is not None:
            if self._when <= when:
                return  # already due to fire no later than that
            self._handle.cancel()
        self._when = when
        self._handle = loop.call_at(when, self._on_timer, context=self._context)

    def _on_timer(self) -> None:
        self._handle, self._when = None, math.inf
        try:
            self.fire_due()
        finally:
            if self._loop is not None:
                self._schedule()
