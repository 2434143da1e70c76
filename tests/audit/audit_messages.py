"""Update messages of the shape `kairos.wire.update_message` produces (see its module docstring),
built by hand so the audit can be tested on its own: a session lifecycle as the actor would emit it.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class Lifecycle:
    """A two-participant chess-clock session; each method returns the next update message."""

    def __init__(self, t0: int = 1_790_000_000_000, owner: str = "owner-1") -> None:
        self.session_id = str(uuid.uuid4())
        self.players = [str(uuid.uuid4()), str(uuid.uuid4())]
        self.now = t0
        self.version = 0
        self.sent: list[bytes] = []  # every message produced so far (to replay them)
        self.state: dict[str, Any] = {
            "session_id": self.session_id,
            "sync_mode": "per_participant",
            "status": "pending",
            "version": 0,
            "participants": [
                {"participant_id": p, "participant_index": i, "total_time_ms": 300_000,
                 "time_used_ms": 0, "time_remaining_ms": 300_000, "cycle_count": 0,
                 "is_active": False, "has_expired": False}
                for i, p in enumerate(self.players)
            ],
            "active_participant_id": None,
            "total_time_ms": 600_000,
            "time_per_cycle_ms": None,
            "cycle_started_at": None,
            "session_started_at": None,
            "session_completed_at": None,
            "increment_ms": 0,
            "created_at": iso(t0),
            "updated_at": iso(t0),
            "server_time_ms": t0,
            "expiry_policy": "end_session",
            "visibility": "private",
            "owner": owner,
        }

    def _message(self, events: list[tuple[str, str | None, dict]], *, deleted: bool = False) -> bytes:
        self.now += 1_500
        self.version += 1
        self.state.update(version=self.version, updated_at=iso(self.now), server_time_ms=self.now)
        body = {
            "session_id": self.session_id,
            "version": self.version,
            "server_time_ms": self.now,
            "events": [
                {"type": t, "session_id": self.session_id, "version": self.version, "at_ms": self.now,
                 "participant_id": p, "data": d}
                for t, p, d in events
            ],
            "state": None if deleted else copy.deepcopy(self.state),
        }
        self.sent.append(json.dumps(body).encode())
        return self.sent[-1]

    def _activate(self, index: int | None) -> None:
        for i, p in enumerate(self.state["participants"]):
            p["is_active"] = i == index
        self.state["active_participant_id"] = None if index is None else self.players[index]
        self.state["cycle_started_at"] = None if index is None else iso(self.now + 1_500)

    def create(self) -> bytes:
        return self._message([("session_created", None, {})])

    def start(self) -> bytes:
        self.state.update(status="running", session_started_at=iso(self.now + 1_500))
        self._activate(0)
        return self._message([("session_started", self.players[0], {"cycle_number": 0})])

    def switch(self, *, warn: bool = False) -> bytes:
        active = self.players.index(self.state["active_participant_id"])
        ended = self.state["participants"][active]
        ended["time_used_ms"] += 1_500
        ended["total_time_ms"] -= 1_500
        ended["time_remaining_ms"] = ended["total_time_ms"]
        ended["cycle_count"] += 1
        nxt = 1 - active
        self._activate(nxt)
        cycle = sum(p["cycle_count"] for p in self.state["participants"])
        events = [("cycle_switched", self.players[nxt], {
            "time_remaining_ms": self.state["participants"][nxt]["total_time_ms"],
            "time_elapsed_ms": 1_500, "cycle_number": cycle,
            "previous_participant_id": self.players[active]})]
        if warn:
            events.append(("time_warning", self.players[nxt], {"time_remaining_ms": 20_000}))
        return self._message(events)

    def pause(self) -> bytes:
        self.state["status"] = "paused"
        return self._message([("session_paused", self.state["active_participant_id"], {})])

    def resume(self) -> bytes:
        self.state["status"] = "running"
        return self._message([("session_resumed", self.state["active_participant_id"], {})])

    def complete(self) -> bytes:
        self.state.update(status="completed", session_completed_at=iso(self.now + 1_500))
        self._activate(None)
        return self._message([("session_completed", None, {})])

    def delete(self) -> bytes:
        return self._message([("session_deleted", None, {})], deleted=True)

    def full(self) -> list[bytes]:
        """create, start, 3 switches, pause, resume, complete: 8 messages, versions 1..8."""
        return [self.create(), self.start(), self.switch(), self.switch(), self.switch(),
                self.pause(), self.resume(), self.complete()]


LIFECYCLE_TYPES = [
    "session_created", "session_started", "cycle_switched", "cycle_switched", "cycle_switched",
    "session_paused", "session_resumed", "session_completed",
]
