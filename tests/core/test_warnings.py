"""TIME_WARNING: once per turn, when the active clock crosses `time_warning_ms`."""

from __future__ import annotations

from kairos import Pause, Resume, Start, Switch, Tick, apply, next_deadline

from .helpers import T0, P, make_create

S = T0 + 1000


def _started(mode: str = "per_participant", **kw):
    s = apply(None, make_create(mode, **kw), T0).state
    return apply(s, Start(), S).state


def test_warning_fires_exactly_when_the_threshold_is_crossed() -> None:
    s = _started(bank=30_000, time_warning_ms=10_000)
    assert next_deadline(s) == S + 20_000
    assert not apply(s, Tick(), S + 19_999).changed
    r = apply(s, Tick(), S + 20_000)
    [w] = r.events
    assert (w.type, w.participant_id, w.at_ms) == ("time_warning", P[0], S + 20_000)
    assert (w.data["time_remaining_ms"], w.data["time_warning_ms"]) == (10_000, 10_000)
    assert next_deadline(r.state) == S + 30_000  # then the flag


def test_warning_is_sent_once_per_turn_even_across_a_pause() -> None:
    s = _started(bank=30_000, time_warning_ms=10_000)
    s = apply(s, Tick(), S + 20_000).state
    s = apply(s, Pause(), S + 21_000).state
    r = apply(s, Resume(), S + 50_000)
    assert [e.type for e in r.events] == ["session_resumed"]
    assert next_deadline(r.state) == S + 50_000 + 9000


def test_turn_starting_below_the_threshold_warns_at_once() -> None:
    s = _started(bank=30_000, time_warning_ms=10_000)
    s = apply(s, Tick(), S + 20_000).state  # P0 warned
    s = apply(s, Switch(), S + 25_000).state  # P0 has 5 s left
    r = apply(s, Switch(), S + 26_000)  # back to P0, below the threshold
    assert [(e.type, e.participant_id) for e in r.events] == [
        ("cycle_switched", P[0]), ("time_warning", P[0])]
    assert r.events[1].data["time_remaining_ms"] == 5000


def test_missed_warning_and_expiry_come_in_one_tick() -> None:
    s = _started(bank=30_000, time_warning_ms=10_000)
    r = apply(s, Tick(), S + 40_000)
    assert [e.type for e in r.events] == ["time_warning", "participant_expired",
                                          "session_expired"]
    assert [e.at_ms for e in r.events] == [S + 20_000, S + 30_000, S + 30_000]


def test_zero_threshold_never_warns() -> None:
    s = _started(bank=5000, time_warning_ms=0)
    assert next_deadline(s) == S + 5000
    assert "time_warning" not in [e.type for e in apply(s, Tick(), S + 5000).events]


def test_per_cycle_warns_on_the_turn_clock_every_turn() -> None:
    s = _started("per_cycle", n=2, time_per_cycle_ms=10_000, time_warning_ms=3000)
    assert next_deadline(s) == S + 7000
    s = apply(s, Tick(), S + 7000).state
    r = apply(s, Tick(), S + 10_000)  # time-out; P1's fresh turn is above the threshold
    assert [e.type for e in r.events] == ["turn_timed_out", "cycle_switched"]
    assert next_deadline(r.state) == S + 17_000


def test_global_warning_is_repeated_for_each_new_turn_below_the_threshold() -> None:
    s = _started("global", n=2, total_time_ms=20_000, time_warning_ms=5000)
    s = apply(s, Tick(), S + 15_000).state
    r = apply(s, Switch(), S + 16_000)
    assert [(e.type, e.participant_id) for e in r.events] == [
        ("cycle_switched", P[1]), ("time_warning", P[1])]


def test_uncapped_count_up_never_warns() -> None:
    s = _started("count_up", time_warning_ms=1000)
    assert next_deadline(s) is None
