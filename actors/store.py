"""The Redis side of `actors.actor.Store`: every actor write is one fenced script call.

Every write is safe to repeat (a client retry after a lost reply): the scripts answer a repeat of
a write that already happened with ALREADY_WRITTEN, which counts as written here.

Under load, writes of different sessions share round trips: up to `parallel` writes go out at
once (so a lone command never waits), and writes arriving while those are in flight leave
together in one pipeline when a slot frees. Each is still its own atomic, fenced script.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from actors.actor import Lease
from actors.keys import ALREADY_WRITTEN, Scripts
from actors.metrics import WRITES_REPEATED
from actors.router import handoff_message


def _written(code: int) -> int:
    """A repeat answered ALREADY_WRITTEN means our write is durable: WRITTEN (1) for the actor."""
    if code == ALREADY_WRITTEN:
        WRITES_REPEATED.inc()
        return 1
    return code


class _Queued:
    __slots__ = ("argv", "done", "result", "error")

    def __init__(self, argv: tuple[Any, ...]) -> None:
        self.argv = argv
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class RedisStore:
    """Fenced checkpoint writes, deletes and releases through the scripts of `actors.keys`."""

    def __init__(self, scripts: Scripts, spawn: Callable[[Callable[[], Awaitable[None]]], None],
                 *, parallel: int = 4) -> None:
        self.scripts = scripts
        self._spawn = spawn
        self.parallel = parallel
        self._in_flight = 0
        self._queue: list[_Queued] = []

    async def write(
        self, lease: Lease, session_id: str, checkpoint: bytes, message: bytes, deadline_ms: int | None,
        reply: tuple[str, bytes] | None = None, *, version: int | None = None,
    ) -> int:
        """Checkpoint + outbox + publish + deadline (+ a forwarded asker's answer) in one round
        trip: 1 / 0 fenced / -1 lost. `version` (the checkpoint's) makes a repeat harmless."""
        argv = self.scripts.fenced_write_argv(
            lease.incarnation, lease.epoch, session_id, checkpoint, message, deadline_ms, reply, version=version)
        if self._in_flight < self.parallel and not self._queue:
            self._in_flight += 1
            try:
                return _written(int(await self.scripts.do_fenced_write_argv(argv)))
            finally:
                self._in_flight -= 1
                self._flush_queue()
        queued = _Queued(argv)
        self._queue.append(queued)
        await queued.done.wait()
        if queued.error is not None:
            raise queued.error
        return _written(int(queued.result))

    def _flush_queue(self) -> None:
        if self._queue and self._in_flight < self.parallel:
            batch, self._queue = self._queue, []
            self._in_flight += 1
            self._spawn(lambda: self._send(batch))

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            results = await self.scripts.do_fenced_writes([q.argv for q in batch])
        except Exception as e:  # the whole round trip failed: every outcome is unknown
            results = [e] * len(batch)
        finally:
            self._in_flight -= 1
        for q, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                q.error = result
            else:
                q.result = result
            q.done.set()
        self._flush_queue()

    async def delete(self, lease: Lease, session_id: str, message: bytes) -> int:
        """Delete checkpoint, release the lease, outbox + publish the deletion: 1 / 0 / -1."""
        return _written(int(await self.scripts.do_fenced_delete(lease.incarnation, lease.epoch, session_id, message)))

    async def was_deleted(self, session_id: str) -> bool:
        """Deleted on purpose (tombstone): the audit snapshot must not bring it back."""
        return await self.scripts.was_deleted(session_id)

    async def release(self, lease: Lease, session_id: str) -> None:
        """Give the lease up (no-op if it is no longer ours)."""
        await self.scripts.do_release(lease.incarnation, lease.epoch, session_id)

    async def hand_off(self, lease: Lease, session_id: str, target: str | None) -> None:
        """Give the lease to `target` (which activates at once), or just release it."""
        if target is None:
            await self.release(lease, session_id)
        else:
            await self.scripts.do_hand_off(lease.incarnation, lease.epoch, session_id, target,
                                           handoff_message(session_id))
