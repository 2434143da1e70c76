"""Pydantic models of docs/api.md: request bodies (validated) and response shapes (OpenAPI only).

Responses are built by `kairos.wire` as plain dicts on the hot path; the response models here
exist so `/api-docs.json` documents them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
)

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
Uuid = Annotated[str, StringConstraints(pattern=UUID_PATTERN), AfterValidator(str.lower)]
"""A UUID in RFC 9562 text form, any version, case-insensitive; normalised to lower case."""

Duration = Annotated[StrictInt, Field(ge=1000, le=86_400_000)]
SyncModeName = Literal["per_participant", "per_cycle", "per_group", "global", "count_up"]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_PARTICIPANT_INDEX = 2**31 - 1
_MAX_DETAILS = 20  # one hostile body cannot make an error answer huge


def unstorable(value: Any, path: str = "") -> list[dict[str, str]]:
    """Validation details for what no store can keep, anywhere in a parsed JSON value: strings
    (and keys) with U+0000 (PostgreSQL refuses it) or lone surrogates (not Unicode: no UTF-8
    encoding exists), integers outside the 64-bit range and non-finite numbers (`1e400`)."""
    out: list[dict[str, str]] = []
    _walk(value, path, out)
    return out


def _walk(value: Any, path: str, out: list[dict[str, str]]) -> None:
    if len(out) >= _MAX_DETAILS:
        return
    if isinstance(value, str):
        problem = _bad_text(value)
        if problem:
            out.append(_detail(path or "body", problem, "invalid_string"))
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            out.append(_detail(path or "body", "must be a 64-bit integer", "out_of_range"))
    elif isinstance(value, float):
        if not math.isfinite(value):
            out.append(_detail(path or "body", "must be a finite number", "out_of_range"))
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = _bad_text(key)
            if problem:
                out.append(_detail(path or "body", f"keys {problem}", "invalid_string"))
                continue
            _walk(item, f"{path}.{key}" if path else key, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{path}.{i}" if path else str(i), out)


def _bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain U+0000"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


class _Body(BaseModel):
    # Unknown keys are ignored (docs/api.md), so newer clients can talk to older servers.
    model_config = ConfigDict(extra="ignore")


class ParticipantIn(_Body):
    """One participant of CreateSession."""
    participant_id: Uuid
    participant_index: Annotated[StrictInt, Field(ge=0, le=MAX_PARTICIPANT_INDEX)] | None = None
    total_time_ms: Duration
    group_id: Uuid | None = None


class CreateSession(_Body):
    """POST /v1/sessions body."""

    session_id: Uuid
    sync_mode: SyncModeName
    participants: Annotated[list[ParticipantIn], Field(min_length=1, max_length=1000)]
    total_time_ms: Duration | None = None
    time_per_cycle_ms: Duration | None = None
    increment_ms: Annotated[StrictInt, Field(ge=0, le=60_000)] = 0
    max_time_ms: Duration | None = None
    expiry_policy: Literal["end_session", "skip_participant", "auto_advance"] | None = None
    time_warning_ms: Annotated[StrictInt, Field(ge=0, le=86_400_000)] | None = None
    visibility: Literal["private", "public"] = "private"
    metadata: dict[str, Any] | None = Field(
        None, description="stored and returned: at most 10,240 bytes as compact UTF-8 JSON; no "
        "U+0000 or lone surrogates in any string or key, integers within the signed 64-bit range")

    def cross_field_errors(self) -> list[dict[str, str]]:
        """Rules spanning several fields, as validation details (empty when all hold)."""
        out = []
        if self.sync_mode == "per_cycle" and self.time_per_cycle_ms is None:
            out.append(_detail("time_per_cycle_ms", "is required for per_cycle", "required"))
        seen: set[str] = set()
        for i, p in enumerate(self.participants):
            if p.participant_id in seen:
                out.append(_detail(f"participants.{i}.participant_id", "duplicate participant_id", "duplicate"))
            seen.add(p.participant_id)
        return out


def _detail(field: str, message: str, code: str) -> dict[str, str]:
    return {"field": field, "message": message, "code": code}


class SwitchBody(_Body):
    """POST /v1/sessions/{id}/switch body (optional)."""

    next_participant_id: Uuid | None = None
    expected_active_participant_id: Uuid | None = None


class DeviceIn(_Body):
    """POST /v1/devices body."""

    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    platform: Literal["ios", "android", "web"]
    sub: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        None, description="whose token it is: the caller (default); another `sub` only for an admin, "
        "who may so reassign a token someone else registered")


class EventsQuery(_Body):
    """Query string of GET /v1/sessions/{id}/events."""
    after_version: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 500


# ---- response shapes (documentation) ----


class ParticipantOut(BaseModel):
    """Participant in a Session (live `time_remaining_ms`)."""
    participant_id: str
    participant_index: int
    total_time_ms: int = Field(description="bank remaining at the last change")
    time_used_ms: int
    time_remaining_ms: int = Field(description="live, as of server_time_ms")
    cycle_count: int
    is_active: bool
    has_expired: bool
    group_id: str | None = Field(None, description="omitted if unset")


class SessionOut(BaseModel):
    """Session (docs/api.md); unset optional keys are omitted."""
    session_id: str
    sync_mode: SyncModeName
    status: Literal["pending", "running", "paused", "expired", "completed", "cancelled"]
    version: int
    participants: list[ParticipantOut]
    active_participant_id: str | None
    total_time_ms: int | None
    time_per_cycle_ms: int | None
    cycle_started_at: str | None
    session_started_at: str | None
    session_completed_at: str | None
    increment_ms: int
    max_time_ms: int | None = Field(None, description="omitted if unset")
    created_at: str
    updated_at: str
    server_time_ms: int
    expiry_policy: Literal["end_session", "skip_participant", "auto_advance"]
    time_warning_ms: int | None = Field(None, description="omitted if unset")
    visibility: Literal["private", "public"]
    metadata: dict[str, Any] | None = Field(None, description="omitted if unset")
    owner: str


class SwitchResultOut(BaseModel):
    """SwitchResult (docs/api.md)."""
    session_id: str
    active_participant_id: str | None
    cycle_started_at: str | None
    participants: list[ParticipantOut]
    status: str
    expired_participant_id: str | None = Field(None, description="only when an expiry happened")
    version: int
    server_time_ms: int


class SessionEnvelope(BaseModel):
    """`{"data": Session}`."""
    data: SessionOut


class SwitchEnvelope(BaseModel):
    """`{"data": SwitchResult}`."""
    data: SwitchResultOut


class EventOut(BaseModel):
    """One audit event."""
    type: str
    session_id: str
    version: int
    at_ms: int
    participant_id: str | None
    data: dict[str, Any]


class EventsEnvelope(BaseModel):
    """`{"data": [Event...]}`."""
    data: list[EventOut]


class DeviceEnvelope(BaseModel):
    """`{"data": Device}`."""
    data: DeviceIn


class InstancesEnvelope(BaseModel):
    """`{"data": [instance...]}`."""
    data: list[dict[str, Any]]


class StatusOut(BaseModel):
    """Unwrapped /health and /ready body."""
    status: str
    error: str | None = None


class TimeOut(BaseModel):
    """Unwrapped /v1/time body (four-timestamp sync fields are new)."""
    timestamp_ms: int
    server_version: str = Field(description="the API version clients code against (2.0.0)")
    implementation: str = Field(description="server software and version, e.g. kairos-0.2.0")
    drift_tolerance_ms: int
    server_receive_ms: int
    server_send_ms: int


class ErrorDetail(BaseModel):
    """One validation problem: dotted field path, message, code."""
    field: str
    message: str
    code: str


class ErrorInner(BaseModel):
    """The `error` object."""
    code: str
    message: str
    details: list[ErrorDetail] | None = None
    retry_after_seconds: int | None = None


class ErrorOut(BaseModel):
    """Every error body: `{"error": {...}}`, never with `data`."""
    error: ErrorInner


class DrainOut(BaseModel):
    """POST /admin/drain answer: the instance now draining, and what happens next."""
    status: Literal["draining"]
    instance_id: str
    plan: str = Field(description="what the drain will do: hand sessions off to the other live "
                      "instances, or (the last instance) release them and exit")


class DrainEnvelope(BaseModel):
    """`{"data": {"status": "draining", "instance_id": ..., "plan": ...}}`."""
    data: DrainOut


class OwnerOut(BaseModel):
    """Who holds a session's lease; all null (alive false) while nobody does."""
    session_id: str
    instance_id: str | None
    incarnation: str | None = Field(description="the holder's incarnation id (new at every start)")
    epoch: int | None
    alive: bool


class OwnerEnvelope(BaseModel):
    """`{"data": Owner}`."""
    data: OwnerOut
