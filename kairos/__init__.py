"""Kairos domain core: session model, time controls, commands, pure transitions, wire form.

The client SDK is `kairos.client` (`KairosClient`, `KairosSync`); `pip install kairos` installs
only what it needs.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

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

try:
    __version__ = _version("kairos")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "Cancel", "Command", "Complete", "Create", "Delete", "Event", "KairosError", "ParticipantSpec",
    "Participant", "Pause", "Result", "Resume", "Session", "Start", "Status", "Switch", "SyncMode",
    "Tick", "apply", "decode", "encode", "next_deadline", "view",
]
