"""The pure transition function and the deadline/view rules. No I/O, no clock: `now_ms` comes in.

CONTRACT (other packages rely on it):
- `apply(state, command, now_ms) -> Result`. `state` is None only for `Create`. The input is never
  mutated. A rejected command raises a `kairos.errors.KairosError` and changes nothing.
- An accepted command whose `command_id` is already in `state.recent` returns
  `Result(state, [], replayed=True, outcome=<the stored outcome>)` with the state unchanged.
- An accepted command bumps `version` by exactly 1 and records its `command_id` (if any) in the
  bounded idempotency window (last `IDEMPOTENCY_WINDOW` ids).
- `Tick` applies every deadline that has passed at `now_ms`; when nothing is due it returns the
  same state with no events (`changed` False) and no version bump.
- `Delete` returns `state=None` with a `session_deleted` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kairos.commands import Command
from kairos.events import Event
from kairos.session import Session

IDEMPOTENCY_WINDOW = 64


@dataclass(frozen=True, slots=True)
class Result:
    """What a transition produced. `outcome` is the small record kept for idempotent replays:
    {"version": int, "expired_participant_id": str | None}."""

    state: Session | None
    events: list[Event] = field(default_factory=list)
    replayed: bool = False
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.events) and not self.replayed


def apply(state: Session | None, command: Command, now_ms: int) -> Result:
    """Apply one command at `now_ms`; raise a KairosError if it is rejected."""
    raise NotImplementedError


def next_deadline(state: Session) -> int | None:
    """The exact ms at which `apply(state, Tick(), t)` would change something, or None."""
    raise NotImplementedError


def view(state: Session, now_ms: int) -> Session:
    """A copy with live times as of `now_ms` (active bank counted down while running)."""
    raise NotImplementedError
