"""The one module that owns the Redis key schema and the Lua scripts.

Nothing else in the code base spells a key or channel name: everything goes through `Keys`.
"""

from __future__ import annotations


# Consumer groups on the outbox stream (`Keys.outbox`): each group sees every entry once.
AUDIT_GROUP = "audit"  # copies events into PostgreSQL (actors/audit.py)
PUSH_GROUP = "push"  # turns events into FCM notifications (actors/push.py)


class Keys:
    """Key and channel names under one deployment prefix (`KAIROS_KEY_PREFIX`)."""

    def __init__(self, prefix: str = "kairos:") -> None:
        self.prefix = prefix

    def checkpoint(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}:cp"

    def lease(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}:lease"

    def channel(self, session_id: str) -> str:
        """Pub/sub channel carrying the session's update messages (`kairos.wire.update_message`)."""
        return f"{self.prefix}s:{session_id}:ch"

    def liveness(self, incarnation: str) -> str:
        return f"{self.prefix}i:{incarnation}:alive"

    def inbox(self, incarnation: str) -> str:
        return f"{self.prefix}i:{incarnation}:inbox"

    def reply_channel(self, incarnation: str) -> str:
        return f"{self.prefix}i:{incarnation}:replies"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    @property
    def deadlines(self) -> str:
        """Sorted set: session_id scored by its next deadline (running sessions only)."""
        return f"{self.prefix}deadlines"

    @property
    def outbox(self) -> str:
        """The outbox stream: one entry per accepted change, field `m` = update message bytes."""
        return f"{self.prefix}outbox"

    def devices(self, sub: str) -> str:
        return f"{self.prefix}devices:{sub}"
