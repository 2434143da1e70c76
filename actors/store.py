"""The Redis side of `actors.actor.Store`: every actor write is one fenced script call."""

from __future__ import annotations

from actors.actor import Lease
from actors.keys import Scripts
from actors.router import handoff_message


class RedisStore:
    """Fenced checkpoint writes, deletes and releases through the scripts of `actors.keys`."""

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts

    async def write(
        self, lease: Lease, session_id: str, checkpoint: bytes, message: bytes, deadline_ms: int | None,
        reply: tuple[str, bytes] | None = None,
    ) -> int:
        """Checkpoint + outbox + publish + deadline (+ a forwarded asker's answer) in one round
        trip: 1 / 0 fenced / -1 lost."""
        return int(await self.scripts.do_fenced_write(
            lease.incarnation, lease.epoch, session_id, checkpoint, message, deadline_ms, reply))

    async def delete(self, lease: Lease, session_id: str, message: bytes) -> int:
        """Delete checkpoint, release the lease, outbox + publish the deletion: 1 / 0 / -1."""
        return int(await self.scripts.do_fenced_delete(lease.incarnation, lease.epoch, session_id, message))

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
