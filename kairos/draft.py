"""A copy-on-write working copy of a Session that a transition mutates, plus the events it emits.

Transitions never touch their input: the draft shallow-copies the session and copies a
participant only when it is first changed, so a switch in a 1000-participant session copies two
participants, not a thousand.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, TypeVar

from kairos.events import Event
from kairos.session import Participant, Session

T = TypeVar("T")


def _shallow_copier(cls: type[T]) -> Callable[[T], T]:
    """A shallow copy for a slotted dataclass that calls its `__init__` with the current field
    values: copy.copy goes through `__reduce_ex__` and costs 4-6x more on every command."""
    fs = dataclasses.fields(cls)  # type: ignore[arg-type]
    assert len(fs) > 1 and all(f.init for f in fs), cls  # attrgetter of one name: no tuple
    get = operator.attrgetter(*(f.name for f in fs))
    return lambda obj: cls(*get(obj))


_copy_session = _shallow_copier(Session)
_copy_participant = _shallow_copier(Participant)


class Draft:
    """The session being built by one command, and the events it has produced so far."""

    __slots__ = ("s", "_touched", "_events", "expired_participant_id")

    def __init__(self, state: Session) -> None:
        s = _copy_session(state)
        s.participants = list(state.participants)
        self.s = s
        self._touched: set[int] = set()
        self._events: list[tuple[str, int, str | None, dict[str, Any]]] = []
        self.expired_participant_id: str | None = None

    def p(self, index: int) -> Participant:
        """The participant at `index`, copied on first use so the input state stays untouched."""
        if index not in self._touched:
            self.s.participants[index] = _copy_participant(self.s.participants[index])
            self._touched.add(index)
        return self.s.participants[index]

    def emit(self, type_: str, at_ms: int, participant_id: str | None = None, **data: Any) -> None:
        """Record an event; its version is filled in when the command is accepted."""
        self._events.append((type_, at_ms, participant_id, data))

    def emitted(self, type_: str) -> bool:
        """Whether an event of this type was already emitted by this command."""
        return any(e[0] == type_ for e in self._events)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def events(self, session_id: str, version: int) -> list[Event]:
        """The emitted events, stamped with the version the command produced."""
        return [Event(t, session_id, version, at, pid, data) for t, at, pid, data in self._events]
