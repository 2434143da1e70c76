"""Worked examples of each time control (the same numbers as docs/time-controls.md)."""

from __future__ import annotations

from kairos import ParticipantSpec, Pause, Resume, Start, Switch, Tick, apply, next_deadline, view
from kairos.wire import session_json

from .helpers import T0, G, P, make_create

S = T0 + 1000  # start time used by every example


def _started(mode: str, **kw):
    s = apply(None, make_create(mode, **kw), T0).state
    return apply(s, Start(), S).state


def _remaining(state, now):
    return [p.time_remaining_ms for p in view(state, now).participants]


# --- per_participant ------------------------------------------------------------------------


def test_per_participant_bank_drains_only_while_active_and_gains_the_increment() -> None:
    s = _started("per_participant", n=2, bank=60_000, increment_ms=2000)
    assert _remaining(s, S + 5000) == [55_000, 60_000]
    s = apply(s, Switch(), S + 5000).state
    assert [p.total_time_ms for p in s.participants] == [57_000, 60_000]
    assert _remaining(s, S + 8000) == [57_000, 57_000]
    s = apply(s, Switch(), S + 8000).state
    assert [p.total_time_ms for p in s.participants] == [57_000, 59_000]
    assert [(p.time_used_ms, p.increments_ms, p.cycle_count) for p in s.participants] == [
        (5000, 2000, 1), (3000, 2000, 1)]
    assert next_deadline(s) == S + 8000 + 57_000


def test_per_participant_view_is_frozen_while_paused() -> None:
    s = _started("per_participant", bank=60_000)
    s = apply(s, Pause(), S + 4000).state
    assert _remaining(s, S + 4000) == _remaining(s, S + 400_000) == [56_000, 60_000]
    assert next_deadline(s) is None


# --- per_group ------------------------------------------------------------------------------


def _teams(**kw):
    groups = [G[0], G[1], G[0], G[1]]
    return _started("per_group", n=4, bank=60_000, groups=groups, **kw)


def test_per_group_members_share_one_bank() -> None:
    s = _teams(increment_ms=1000)
    s = apply(s, Switch(), S + 10_000).state  # P0 (team A) played 10 s
    assert [p.total_time_ms for p in s.participants] == [51_000, 60_000, 51_000, 60_000]
    assert [p.time_used_ms for p in s.participants] == [10_000, 0, 0, 0]
    s = apply(s, Switch(), S + 15_000).state  # P1 (team B) played 5 s
    assert _remaining(s, S + 20_000) == [46_000, 56_000, 46_000, 56_000]  # P2 of team A runs
    assert s.active.participant_id == P[2]


def test_per_group_expiry_expires_the_whole_group() -> None:
    s = _teams()
    r = apply(s, Tick(), S + 60_000)
    assert [p.has_expired for p in r.state.participants] == [True, False, True, False]
    [expired, ended] = r.events
    assert expired.data["expired_participant_ids"] == [P[0], P[2]]
    assert expired.data["group_id"] == G[0]
    assert ended.type == "session_expired" and r.state.status.value == "expired"


def test_ungrouped_participants_keep_their_own_bank_in_per_group() -> None:
    specs = (ParticipantSpec(P[0], 5000, group_id=G[0]), ParticipantSpec(P[1], 7000))
    s = _started("per_group", participants=specs)
    s = apply(s, Switch(), S + 1000).state
    assert [p.total_time_ms for p in s.participants] == [4000, 7000]


# --- per_cycle ------------------------------------------------------------------------------


def test_per_cycle_turn_times_out_and_advances_automatically() -> None:
    s = _started("per_cycle", n=3, bank=60_000, time_per_cycle_ms=10_000)
    assert next_deadline(s) == S + 10_000
    r = apply(s, Tick(), S + 10_000)
    assert [e.type for e in r.events] == ["turn_timed_out", "cycle_switched"]
    assert r.events[0].participant_id == P[0] and r.events[1].participant_id == P[1]
    assert r.outcome["expired_participant_id"] is None
    s = r.state
    assert (s.active.participant_id, s.cycle_started_at_ms) == (P[1], S + 10_000)
    assert [(p.total_time_ms, p.time_used_ms, p.cycle_count, p.has_expired)
            for p in s.participants][0] == (60_000, 10_000, 1, False)  # the bank is not used
    assert _remaining(s, S + 14_000) == [10_000, 6000, 10_000]


def test_per_cycle_switch_gives_the_next_participant_a_full_turn() -> None:
    s = _started("per_cycle", n=2, time_per_cycle_ms=10_000)
    s = apply(s, Switch(), S + 4000).state
    assert next_deadline(s) == S + 14_000


def test_per_cycle_pause_freezes_the_turn_clock() -> None:
    s = _started("per_cycle", n=2, time_per_cycle_ms=10_000)
    s = apply(s, Pause(), S + 3000).state
    assert _remaining(s, S + 50_000) == [7000, 10_000]
    s = apply(s, Resume(), S + 100_000).state
    assert next_deadline(s) == S + 107_000


def test_per_cycle_end_session_policy_expires_on_time_out() -> None:
    s = _started("per_cycle", n=2, time_per_cycle_ms=10_000, expiry_policy="end_session")
    r = apply(s, Tick(), S + 10_000)
    assert [e.type for e in r.events] == ["participant_expired", "session_expired"]
    assert r.outcome["expired_participant_id"] == P[0]


# --- global ---------------------------------------------------------------------------------


def test_global_is_one_countdown_whatever_the_switches() -> None:
    s = _started("global", n=2, total_time_ms=60_000)
    s = apply(s, Switch(), S + 20_000).state
    assert s.global_remaining_ms == 40_000
    assert [p.time_used_ms for p in s.participants] == [20_000, 0]
    assert [p.total_time_ms for p in s.participants] == [300_000, 300_000]  # declared, unused
    assert _remaining(s, S + 30_000) == [30_000, 30_000]
    assert next_deadline(s) == S + 60_000
    r = apply(s, Tick(), S + 60_000)
    assert r.state.status.value == "expired"
    assert r.outcome["expired_participant_id"] == P[1]  # who held the clock when it ran out
    assert [p.has_expired for p in r.state.participants] == [False, True]


def test_global_ignores_skip_participant() -> None:
    s = _started("global", n=3, total_time_ms=5000, expiry_policy="skip_participant")
    assert apply(s, Tick(), S + 5000).state.status.value == "expired"


# --- count_up -------------------------------------------------------------------------------


def test_count_up_without_cap_never_expires() -> None:
    s = _started("count_up", n=2)
    assert next_deadline(s) is None
    assert apply(s, Tick(), S + 10**8).state is s
    s = apply(s, Switch(), S + 90_000).state
    assert [p.time_used_ms for p in s.participants] == [90_000, 0]
    assert [p.total_time_ms for p in s.participants] == [300_000, 300_000]
    assert _remaining(s, S + 100_000) == [300_000, 300_000]


def test_count_up_cap_counts_the_whole_session() -> None:
    s = _started("count_up", n=2, max_time_ms=30_000)
    s = apply(s, Switch(), S + 10_000).state
    assert _remaining(s, S + 15_000) == [15_000, 15_000]
    assert next_deadline(s) == S + 30_000
    r = apply(s, Tick(), S + 30_000)
    assert r.state.status.value == "expired"
    assert r.events[-1].data["reason"] == "max_time_reached"
    assert [p.time_used_ms for p in r.state.participants] == [10_000, 20_000]


def test_wire_shows_live_time_for_every_mode() -> None:
    for mode in ("per_participant", "per_group", "per_cycle", "global", "count_up"):
        s = _started(mode)
        body = session_json(s, S + 500)
        assert body["participants"][0]["time_remaining_ms"] == _remaining(s, S + 500)[0]
