"""Kairos domain core: session model, time controls, commands, pure transitions, wire form."""

from kairos.codec import decode, encode
from kairos.commands import (
    Cancel,
    Command,
    Complete,
    Create,
    Delete,
    ParticipantSpec,
    Pause,
    Resume,
    Start,
    Switch,
    Tick,
)
from kairos.errors import KairosError
from kairos.events import Event
from kairos.rules import Result, apply, next_deadline, view
from kairos.session import Participant, Session, Status, SyncMode

__all__ = [
    "Cancel", "Command", "Complete", "Create", "Delete", "Event", "KairosError", "ParticipantSpec",
    "Participant", "Pause", "Result", "Resume", "Session", "Start", "Status", "Switch", "SyncMode",
    "Tick", "apply", "decode", "encode", "next_deadline", "view",
]
