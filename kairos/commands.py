"""Commands a session accepts. Every command may carry a `command_id` for idempotency."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ParticipantSpec:
    participant_id: str
    total_time_ms: int
    participant_index: int | None = None
    group_id: str | None = None


@dataclass(frozen=True, slots=True)
class Create:
    """Create a session; `owner` is the creator's token `sub`. Fields as docs/api.md CreateSession."""

    session_id: str
    sync_mode: str
    participants: tuple[ParticipantSpec, ...]
    owner: str
    total_time_ms: int | None = None
    time_per_cycle_ms: int | None = None
    increment_ms: int = 0
    max_time_ms: int | None = None
    expiry_policy: str | None = None
    time_warning_ms: int | None = None
    visibility: str = "private"
    metadata: dict | None = None
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Start:
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Switch:
    next_participant_id: str | None = None
    expected_active_participant_id: str | None = None
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Pause:
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Complete:
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    """The server's own command: apply whatever deadline has passed at `now_ms`."""

    command_id: None = field(default=None, init=False)


Command = Create | Start | Switch | Pause | Resume | Complete | Cancel | Delete | Tick
