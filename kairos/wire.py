"""The wire form of API.md: ISO `...sssZ` times, omitted-vs-null keys, live participant times.

Also the *update message*: the one JSON document per accepted change that the actor publishes on
the session channel AND appends to the outbox stream (same bytes, serialised once):

    {"session_id": str, "version": int, "server_time_ms": int,
     "events": [Event.to_dict(), ...],
     "state": <session_json(state, server_time_ms)> or null when deleted,
     "expired_participant_id": str (only when an expiry happened)}
"""

from __future__ import annotations

from typing import Any

from kairos.events import Event
from kairos.session import Session


def iso_ms(epoch_ms: int) -> str:
    """Epoch ms -> `2026-11-28T21:04:05.123Z`."""
    raise NotImplementedError


def session_json(state: Session, now_ms: int) -> dict[str, Any]:
    """API.md Session body with live times as of `now_ms` (includes `server_time_ms`)."""
    raise NotImplementedError


def switch_result_json(state: Session, now_ms: int, expired_participant_id: str | None) -> dict[str, Any]:
    """API.md SwitchResult body."""
    raise NotImplementedError


def update_message(state: Session | None, events: list[Event], now_ms: int, session_id: str) -> bytes:
    """Serialise the update message (see module docstring) once, as UTF-8 JSON bytes."""
    raise NotImplementedError
