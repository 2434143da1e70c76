"""Domain events emitted by transitions; they feed the outbox (audit and push) and WebSocket frames."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SESSION_CREATED = "session_created"
SESSION_STARTED = "session_started"
CYCLE_SWITCHED = "cycle_switched"
SESSION_PAUSED = "session_paused"
SESSION_RESUMED = "session_resumed"
TIME_WARNING = "time_warning"
PARTICIPANT_EXPIRED = "participant_expired"
TURN_TIMED_OUT = "turn_timed_out"
SESSION_EXPIRED = "session_expired"
SESSION_COMPLETED = "session_completed"
SESSION_CANCELLED = "session_cancelled"
SESSION_DELETED = "session_deleted"


@dataclass(frozen=True, slots=True)
class Event:
    """One event. `version` is the session version the event belongs to.

    `participant_id` is the participant it concerns (new active one for a switch, the expired
    one for an expiry); `data` holds what audit rows and push need: `time_remaining_ms`,
    `time_elapsed_ms` (in the turn that ended), `cycle_number`, `previous_participant_id`, ...
    """

    type: str
    session_id: str
    version: int
    at_ms: int
    participant_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "session_id": self.session_id,
            "version": self.version,
            "at_ms": self.at_ms,
            "participant_id": self.participant_id,
            "data": self.data,
        }
