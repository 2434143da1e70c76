"""Which command is allowed in which status, and the exact error each refusal carries."""

from __future__ import annotations

import pytest

from kairos import (
    Cancel,
    Complete,
    Delete,
    KairosError,
    Pause,
    Resume,
    Start,
    Switch,
    Tick,
    apply,
    encode,
)
from kairos.errors import InvalidStateTransition, SessionExists, SessionNotFound

from .helpers import SID, T0, P, make_create, session_in

NOW = T0 + 5000

# (status before, command, status after) for every accepted transition.
ACCEPTED = [
    ("pending", Start(), "running"),
    ("pending", Complete(), "completed"),
    ("pending", Cancel(), "cancelled"),
    ("running", Switch(), "running"),
    ("running", Pause(), "paused"),
    ("running", Complete(), "completed"),
    ("running", Cancel(), "cancelled"),
    ("paused", Resume(), "running"),
    ("paused", Complete(), "completed"),
    ("paused", Cancel(), "cancelled"),
]


@pytest.mark.parametrize(("before", "command", "after"), ACCEPTED)
def test_accepted_transition_bumps_version_by_one(before: str, command: object, after: str) -> None:
    s = session_in(before)
    frozen = encode(s)
    r = apply(s, command, NOW)
    assert r.state.status.value == after
    assert r.state.version == s.version + 1
    assert r.changed and r.events
    assert all(e.version == r.state.version for e in r.events)
    assert r.outcome == {"version": s.version + 1, "expired_participant_id": None}
    assert encode(s) == frozen  # the input was not touched


# (status, command, message suffix) for every refusal.
REFUSED = [
    ("pending", Switch(), "not running (current status: pending)"),
    ("pending", Pause(), "not running (current status: pending)"),
    ("pending", Resume(), "not paused (current status: pending)"),
    ("running", Start(), "not pending (current status: running)"),
    ("running", Resume(), "not paused (current status: running)"),
    ("paused", Start(), "not pending (current status: paused)"),
    ("paused", Switch(), "not running (current status: paused)"),
    ("paused", Pause(), "not running (current status: paused)"),
    ("completed", Complete(), "already ended (current status: completed)"),
    ("completed", Cancel(), "already ended (current status: completed)"),
    ("completed", Start(), "not pending (current status: completed)"),
    ("cancelled", Complete(), "already ended (current status: cancelled)"),
    ("cancelled", Resume(), "not paused (current status: cancelled)"),
    ("expired", Complete(), "already ended (current status: expired)"),
    ("expired", Switch(), "not running (current status: expired)"),
]


@pytest.mark.parametrize(("status", "command", "suffix"), REFUSED)
def test_refused_transition_names_the_current_status(status: str, command: object,
                                                      suffix: str) -> None:
    s = session_in(status)
    frozen = encode(s)
    with pytest.raises(InvalidStateTransition) as exc:
        apply(s, command, NOW)
    assert str(exc.value) == f"Session {SID} {suffix}"
    assert exc.value.code == "INVALID_STATE_TRANSITION" and exc.value.status == 400
    assert encode(s) == frozen


def test_switch_on_pending_has_the_api_example_message() -> None:
    with pytest.raises(KairosError) as exc:
        apply(session_in("pending"), Switch(), NOW)
    assert exc.value.message == (
        "Session 6f1c2b7e-3a41-4c52-9d0e-1b2c3d4e5f60 not running (current status: pending)")


@pytest.mark.parametrize("status", ["pending", "running", "paused", "completed", "cancelled"])
def test_delete_is_allowed_from_every_status_and_leaves_no_state(status: str) -> None:
    s = session_in(status)
    r = apply(s, Delete(), NOW)
    assert r.state is None
    assert [(e.type, e.version) for e in r.events] == [("session_deleted", s.version + 1)]
    assert r.events[0].data == {"status": status}


@pytest.mark.parametrize("status", ["pending", "paused", "completed", "cancelled"])
def test_tick_outside_running_changes_nothing(status: str) -> None:
    s = session_in(status)
    r = apply(s, Tick(), NOW + 10**9)
    assert r.state is s and not r.events and not r.changed
    assert r.outcome == {"version": s.version, "expired_participant_id": None}


def test_tick_before_any_deadline_changes_nothing() -> None:
    s = session_in("running")
    r = apply(s, Tick(), NOW)
    assert r.state is s and not r.changed


def test_create_on_an_existing_session_is_session_exists() -> None:
    s = session_in("pending")
    with pytest.raises(SessionExists):
        apply(s, make_create(), NOW)


def test_commands_on_a_missing_session_are_not_found() -> None:
    with pytest.raises(SessionNotFound):
        apply(None, Start(), NOW)


def test_complete_charges_the_running_clock_and_clears_the_active_participant() -> None:
    s = session_in("running")  # started at T0+1000
    r = apply(s, Complete(), T0 + 4000)
    first = r.state.participants[0]
    assert (first.total_time_ms, first.time_used_ms) == (297_000, 3000)
    assert r.state.active_index is None
    assert r.state.session_completed_at_ms == T0 + 4000
    assert [(e.type, e.participant_id) for e in r.events] == [("session_completed", P[0])]


def test_pause_charges_and_resume_restarts_the_segment() -> None:
    s = session_in("running")
    s = apply(s, Pause(), T0 + 3000).state
    assert s.participants[0].total_time_ms == 298_000
    s = apply(s, Resume(), T0 + 60_000).state  # the paused minute costs nothing
    assert s.cycle_started_at_ms == T0 + 60_000
    s = apply(s, Switch(), T0 + 61_000).state
    p = s.participants[0]
    assert (p.total_time_ms, p.time_used_ms, p.cycle_count) == (297_000, 3000, 1)
