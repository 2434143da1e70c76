"""The session model: plain slotted dataclasses, epoch milliseconds inside, no I/O.

The wire form (ISO strings, omitted-vs-null keys, live times) is produced by `kairos.wire` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class SyncMode(StrEnum):
    PER_PARTICIPANT = "per_participant"
    PER_CYCLE = "per_cycle"
    PER_GROUP = "per_group"
    GLOBAL = "global"
    COUNT_UP = "count_up"


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    EXPIRED = "expired"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class ExpiryPolicy(StrEnum):
    END_SESSION = "end_session"
    SKIP_PARTICIPANT = "skip_participant"
    AUTO_ADVANCE = "auto_advance"


class Visibility(StrEnum):
    PRIVATE = "private"
    PUBLIC = "public"


TERMINAL = frozenset({Status.EXPIRED, Status.COMPLETED, Status.CANCELLED})


@dataclass(slots=True)
class Participant:
    """One participant; `total_time_ms` is the bank at the last change (SyncKairos meaning)."""

    participant_id: str
    participant_index: int
    total_time_ms: int
    initial_time_ms: int
    time_used_ms: int = 0
    cycle_count: int = 0
    has_expired: bool = False
    group_id: str | None = None
    increments_ms: int = 0  # Fischer increments earned so far (for the conservation rule)
    # Live remaining time as of some `now_ms`; set only on copies made by `kairos.rules.view`
    # (None in stored state, where the bank at the last change is `total_time_ms`).
    time_remaining_ms: int | None = None


@dataclass(slots=True)
class Session:
    """Full state of one session, as checkpointed. Mutated only through copies in `kairos.rules`."""

    session_id: str
    sync_mode: SyncMode
    status: Status
    version: int
    participants: list[Participant]
    owner: str
    created_at_ms: int
    updated_at_ms: int
    total_time_ms: int
    expiry_policy: ExpiryPolicy
    visibility: Visibility = Visibility.PRIVATE
    active_index: int | None = None  # index into `participants`, None when no one is active
    time_per_cycle_ms: int | None = None
    increment_ms: int = 0
    max_time_ms: int | None = None
    time_warning_ms: int | None = None
    metadata: dict | None = None
    cycle_started_at_ms: int | None = None
    session_started_at_ms: int | None = None
    session_completed_at_ms: int | None = None
    # `global`: countdown left at the last change; `count_up`: time left to `max_time_ms` (None
    # when uncapped). Unused by the other modes.
    global_remaining_ms: int | None = None
    # Time already charged to the current turn before `cycle_started_at_ms` (non-zero after a
    # pause inside the turn); `per_cycle` needs it for the turn clock, events report it.
    turn_elapsed_ms: int = 0
    warned: bool = False  # TIME_WARNING already emitted for the current turn
    # Idempotency window: command_id -> stored outcome (see kairos.rules.Result) plus `at_ms`, when
    # it was accepted; oldest first (kairos.rules.IDEMPOTENCY_WINDOW_MS says how long ids stay).
    recent: dict[str, dict] = field(default_factory=dict)

    @property
    def active(self) -> Participant | None:
        return None if self.active_index is None else self.participants[self.active_index]
