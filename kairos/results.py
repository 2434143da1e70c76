"""Typed results of the client SDK: the documented response bodies and WebSocket frames.

Each model is built from the wire JSON with `from_json`, keeps only the documented fields (a newer
server's extra keys are ignored, so old clients keep working) and exposes them as attributes.
`docs/api.md` and `docs/websocket.md` describe every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ParticipantState:
    """A participant as the server shows it; `time_remaining_ms` is as of the body's server time."""

    participant_id: str
    participant_index: int
    total_time_ms: int
    time_used_ms: int
    time_remaining_ms: int
    cycle_count: int
    is_active: bool
    has_expired: bool
    group_id: str | None = None

    @classmethod
    def from_json(cls, d: JSON) -> ParticipantState:
        """From a participant object of a Session or SwitchResult."""
        return cls(d["participant_id"], d["participant_index"], d["total_time_ms"],
                   d["time_used_ms"], d["time_remaining_ms"], d["cycle_count"], d["is_active"],
                   d["has_expired"], d.get("group_id"))


def _participants(d: JSON) -> tuple[ParticipantState, ...]:
    return tuple(ParticipantState.from_json(p) for p in d["participants"])


@dataclass(frozen=True, slots=True)
class SessionState:
    """A Session body: settings, status, `version` and live participant times."""

    session_id: str
    sync_mode: str
    status: str
    version: int
    participants: tuple[ParticipantState, ...]
    active_participant_id: str | None
    total_time_ms: int | None
    time_per_cycle_ms: int | None
    cycle_started_at: str | None
    session_started_at: str | None
    session_completed_at: str | None
    increment_ms: int
    created_at: str
    updated_at: str
    server_time_ms: int
    expiry_policy: str
    visibility: str
    owner: str
    max_time_ms: int | None = None
    time_warning_ms: int | None = None
    metadata: JSON | None = None

    @classmethod
    def from_json(cls, d: JSON) -> SessionState:
        """From a Session object (`data` of most responses, `state` of frames)."""
        return cls(
            d["session_id"], d["sync_mode"], d["status"], d["version"], _participants(d),
            d["active_participant_id"], d.get("total_time_ms"), d.get("time_per_cycle_ms"),
            d.get("cycle_started_at"), d.get("session_started_at"), d.get("session_completed_at"),
            d.get("increment_ms", 0), d["created_at"], d["updated_at"], d["server_time_ms"],
            d.get("expiry_policy", "end_session"), d.get("visibility", "private"),
            d.get("owner", ""), d.get("max_time_ms"), d.get("time_warning_ms"), d.get("metadata"))

    @property
    def active(self) -> ParticipantState | None:
        """The active participant, if any."""
        return next((p for p in self.participants if p.is_active), None)

    def remaining_ms(self, participant_id: str, server_now_ms: float) -> float:
        """A participant's remaining time at `server_now_ms` (counts down only while running)."""
        p = next(p for p in self.participants if p.participant_id == participant_id.lower())
        if self.status != "running" or not p.is_active:
            return p.time_remaining_ms
        return max(0.0, p.time_remaining_ms - max(0.0, server_now_ms - self.server_time_ms))


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """The answer to a switch."""

    session_id: str
    active_participant_id: str | None
    cycle_started_at: str | None
    participants: tuple[ParticipantState, ...]
    status: str
    version: int
    server_time_ms: int
    expired_participant_id: str | None = None

    @classmethod
    def from_json(cls, d: JSON) -> SwitchResult:
        """From a SwitchResult object."""
        return cls(d["session_id"], d["active_participant_id"], d.get("cycle_started_at"),
                   _participants(d), d["status"], d["version"], d["server_time_ms"],
                   d.get("expired_participant_id"))


@dataclass(frozen=True, slots=True)
class ServerTime:
    """`GET /v1/time`: the server clock and the four-timestamp sync fields."""

    timestamp_ms: int
    server_version: str
    drift_tolerance_ms: int
    server_receive_ms: int
    server_send_ms: int
    implementation: str | None = None

    @classmethod
    def from_json(cls, d: JSON) -> ServerTime:
        """From the unwrapped `/v1/time` body."""
        return cls(d["timestamp_ms"], d["server_version"], d["drift_tolerance_ms"],
                   d.get("server_receive_ms", d["timestamp_ms"]),
                   d.get("server_send_ms", d["timestamp_ms"]), d.get("implementation"))


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of a session's audit history."""

    type: str
    session_id: str
    version: int
    at_ms: int
    participant_id: str | None
    data: JSON

    @classmethod
    def from_json(cls, d: JSON) -> AuditEvent:
        """From an element of `GET /v1/sessions/{id}/events`."""
        return cls(d["type"], d["session_id"], d["version"], d["at_ms"], d.get("participant_id"),
                   d.get("data") or {})


@dataclass(frozen=True, slots=True)
class Frame:
    """A WebSocket frame from the server (`type` says which fields are set), or the SDK's own
    `CLOSED` (with `code` and `reason`) when a subscription ends."""

    type: str
    session_id: str | None = None
    timestamp: int | None = None
    state: SessionState | None = None
    participant_id: str | None = None
    remaining_ms: int | None = None
    request_id: str | None = None
    data: JSON | None = None
    code: str | int | None = None
    message: str | None = None
    reason: str | None = None
    raw: JSON = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: JSON) -> Frame:
        """From one decoded frame."""
        return cls(d.get("type", ""), d.get("sessionId"), d.get("timestamp"), _state(d),
                   d.get("participant_id"), d.get("remaining_ms"), d.get("request_id"),
                   d.get("data"), d.get("code"), d.get("message"), d.get("reason"), d)


def _state(frame: JSON) -> SessionState | None:
    state = frame.get("state")
    try:
        return SessionState.from_json(state) if isinstance(state, dict) else None
    except (KeyError, TypeError):  # not a full Session: `raw` still has whatever was sent
        return None
