"""Switch details and what happens when time runs out, per expiry policy."""

from __future__ import annotations

import pytest

from kairos import Complete, Pause, Resume, Start, Switch, Tick, apply, encode, next_deadline
from kairos.errors import Conflict, ValidationError

from .helpers import T0, P, make_create

S = T0 + 1000


def _started(mode: str = "per_participant", **kw):
    s = apply(None, make_create(mode, **kw), T0).state
    return apply(s, Start(), S).state


def test_switch_to_a_named_participant_skips_the_rotation() -> None:
    s = _started(n=3)
    r = apply(s, Switch(next_participant_id=P[2].upper()), S + 1000)
    assert r.state.active.participant_id == P[2]
    assert r.events[0].data["previous_participant_id"] == P[0]


def test_switch_to_self_restarts_the_turn_and_counts_it() -> None:
    s = _started(n=2, increment_ms=1000)
    s = apply(s, Switch(next_participant_id=P[0]), S + 3000).state
    p = s.participants[0]
    assert (s.active_index, p.cycle_count, p.total_time_ms) == (0, 1, 298_000)


def test_switch_to_an_unknown_participant_is_a_validation_error() -> None:
    s = _started()
    with pytest.raises(ValidationError) as exc:
        apply(s, Switch(next_participant_id="00000000-0000-0000-0000-000000000000"), S + 1)
    assert exc.value.details == [{"field": "next_participant_id", "code": "unknown_participant",
                                  "message": "is not a participant of this session"}]


def test_switch_to_an_expired_participant_is_a_validation_error() -> None:
    s = _started(n=3, bank=5000, expiry_policy="skip_participant")
    s = apply(s, Tick(), S + 5000).state  # P0 out, P1 to play
    frozen = encode(s)
    with pytest.raises(ValidationError) as exc:
        apply(s, Switch(next_participant_id=P[0]), S + 6000)
    assert exc.value.details[0]["code"] == "participant_expired"
    assert encode(s) == frozen


def test_expected_active_mismatch_is_a_conflict_and_changes_nothing() -> None:
    s = _started()
    frozen = encode(s)
    with pytest.raises(Conflict) as exc:
        apply(s, Switch(expected_active_participant_id=P[1]), S + 1000)
    assert exc.value.status == 409 and exc.value.code == "CONFLICT"
    assert encode(s) == frozen
    ok = apply(s, Switch(expected_active_participant_id=P[0]), S + 1000)
    assert ok.state.active.participant_id == P[1]


def test_switch_one_ms_before_the_flag_saves_it_and_at_the_flag_does_not() -> None:
    s = _started(bank=5000, increment_ms=1000)
    saved = apply(s, Switch(), S + 4999)
    assert saved.state.participants[0].total_time_ms == 1001
    late = apply(s, Switch(), S + 5000)
    assert late.state.status.value == "expired"
    assert late.outcome == {"version": s.version + 1, "expired_participant_id": P[0]}
    first = late.state.participants[0]
    assert (first.total_time_ms, first.increments_ms, first.cycle_count) == (0, 0, 0)


def test_late_switch_is_consumed_by_the_expiry_it_finds() -> None:
    s = _started(n=3, bank=5000, expiry_policy="skip_participant")
    r = apply(s, Switch(expected_active_participant_id=P[0]), S + 7000)
    # P0 flagged at S+5000 and the turn passed to P1 then; the switch does not also end P1's turn.
    assert r.state.active.participant_id == P[1]
    assert r.state.cycle_started_at_ms == S + 5000
    assert r.outcome["expired_participant_id"] == P[0]
    assert [e.type for e in r.events] == ["participant_expired", "cycle_switched"]
    assert all(e.at_ms == S + 5000 for e in r.events)


def test_skip_participant_continues_until_one_clock_is_left() -> None:
    s = _started(n=3, bank=5000, expiry_policy="skip_participant")
    r = apply(s, Tick(), S + 5000)
    assert (r.state.status.value, r.state.active.participant_id) == ("running", P[1])
    r = apply(r.state, Tick(), S + 10_000)
    assert r.state.status.value == "expired"  # only P2 is left: the session ends
    assert [e.type for e in r.events] == ["participant_expired", "session_expired"]
    assert [p.has_expired for p in r.state.participants] == [True, True, False]
    assert r.state.session_completed_at_ms == S + 10_000 and r.state.active_index is None


def test_skip_participant_rotation_passes_over_expired_participants() -> None:
    s = _started(n=3, bank=5000, expiry_policy="skip_participant")
    s = apply(s, Tick(), S + 5000).state  # P0 out; P1 plays
    s = apply(s, Switch(), S + 6000).state
    s = apply(s, Switch(), S + 7000).state  # from P2 the rotation skips P0
    assert s.active.participant_id == P[1]


def test_single_participant_session_expires_under_skip_participant() -> None:
    s = _started(n=1, bank=2000, expiry_policy="skip_participant")
    assert apply(s, Tick(), S + 2000).state.status.value == "expired"


def test_increment_is_not_added_when_the_flag_fell() -> None:
    s = _started(bank=3000, increment_ms=5000)
    r = apply(s, Tick(), S + 3000)
    assert r.state.participants[0].total_time_ms == 0
    assert r.state.participants[0].increments_ms == 0


def test_pause_after_a_missed_deadline_applies_the_expiry_first() -> None:
    s = _started(n=3, bank=5000, expiry_policy="skip_participant")
    r = apply(s, Pause(), S + 6000)
    assert r.state.status.value == "paused"
    assert [e.type for e in r.events] == ["participant_expired", "cycle_switched",
                                          "session_paused"]
    assert r.state.participants[1].total_time_ms == 4000  # P1 ran from S+5000 to S+6000


def test_commands_after_a_fatal_missed_deadline_are_refused_until_the_tick() -> None:
    s = _started(bank=5000)
    for cmd in (Pause(), Complete()):
        with pytest.raises(Exception, match="current status: expired"):
            apply(s, cmd, S + 6000)
    assert apply(s, Tick(), S + 6000).state.status.value == "expired"


def test_one_command_ends_at_most_one_turn_and_leaves_the_rest_due() -> None:
    s = _started("per_cycle", n=3, time_per_cycle_ms=2000)
    r = apply(s, Tick(), S + 7000)  # three time-outs were missed
    assert [e.type for e in r.events] == ["turn_timed_out", "cycle_switched"]
    types = []
    state = r.state
    while (nd := next_deadline(state)) is not None and nd <= S + 7000:
        step = apply(state, Tick(), S + 7000)
        types.append([e.type for e in step.events])
        state = step.state
    assert types == [["turn_timed_out", "cycle_switched"]] * 2
    assert (state.active.participant_id, state.cycle_started_at_ms) == (P[0], S + 6000)
    assert state.version == s.version + 3


def test_clock_moving_backwards_charges_nothing() -> None:
    s = _started()
    r = apply(s, Switch(), S - 500)  # another instance's clock is behind
    assert r.state.participants[0].time_used_ms == 0
    assert r.state.participants[0].total_time_ms == 300_000


def test_missed_deadline_while_clamped_is_never_negative() -> None:
    s = _started("per_cycle", n=3, time_per_cycle_ms=2000, expiry_policy="skip_participant")
    r = apply(s, Pause(), S + 9000)  # P0 expired at +2000, P1's turn also ran out at +4000
    p1 = r.state.participants[1]
    assert r.state.turn_elapsed_ms == 2000 and p1.time_used_ms == 2000
    r = apply(r.state, Resume(), S + 20_000)  # the clamped turn expires at once on resume
    assert [e.type for e in r.events] == ["session_resumed", "participant_expired",
                                          "session_expired"]


def test_cycle_switched_event_describes_both_sides_of_the_switch() -> None:
    s = _started(n=2, bank=60_000, increment_ms=1000)
    s = apply(s, Switch(), S + 5000).state
    [e] = apply(s, Switch(), S + 7000).events
    assert (e.type, e.participant_id, e.at_ms) == ("cycle_switched", P[0], S + 7000)
    assert e.data == {"previous_participant_id": P[1], "time_elapsed_ms": 2000,
                      "time_remaining_ms": 56_000, "previous_time_remaining_ms": 59_000,
                      "cycle_number": 1, "reason": "switch"}


def test_automatic_switch_events_give_the_new_turn_its_time() -> None:
    s = _started("per_cycle", n=2, time_per_cycle_ms=4000)
    e = apply(s, Tick(), S + 4000).events[1]
    assert (e.participant_id, e.data["time_remaining_ms"], e.data["reason"]) == (
        P[1], 4000, "turn_timed_out")
    s = _started(n=3, bank=5000, expiry_policy="skip_participant")
    e = apply(s, Tick(), S + 5000).events[1]
    assert (e.participant_id, e.data["time_remaining_ms"], e.data["previous_time_remaining_ms"],
            e.data["reason"]) == (P[1], 5000, 0, "participant_expired")
