"""Properties over random command sequences and time gaps (Hypothesis, >= 300 examples each)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings

from kairos import KairosError, Session, Tick, apply, decode, encode, next_deadline, view
from kairos import events as ev
from kairos.modes import bank_key
from kairos.session import TERMINAL, Status, SyncMode

from .helpers import T0
from .strategies import Scenario, scenarios

PROPERTY = settings(max_examples=300, deadline=None)


class Oracle:
    """Time charged to each participant, recomputed from event times alone."""

    def __init__(self) -> None:
        self.charged: dict[str, int] = defaultdict(int)
        self.active: str | None = None
        self.since: int | None = None
        self.warned_this_turn = False

    def _stop(self, at: int) -> None:
        if self.active is not None and self.since is not None:
            self.charged[self.active] += at - self.since
        self.since = None

    def feed(self, e: ev.Event) -> None:
        if e.type in (ev.SESSION_STARTED, ev.CYCLE_SWITCHED):
            self._stop(e.at_ms)
            self.active, self.since, self.warned_this_turn = e.participant_id, e.at_ms, False
        elif e.type == ev.SESSION_RESUMED:
            self.since = e.at_ms
        elif e.type in (ev.SESSION_PAUSED, ev.PARTICIPANT_EXPIRED, ev.TURN_TIMED_OUT,
                        ev.SESSION_COMPLETED, ev.SESSION_CANCELLED):
            self._stop(e.at_ms)
        elif e.type == ev.TIME_WARNING:
            assert not self.warned_this_turn, "two warnings in one turn"
            self.warned_this_turn = True


def _invariants(s: Session, now: int) -> None:
    """Conservation per mode, nothing negative, and the live view consistent."""
    ps = s.participants
    assert all(p.time_used_ms >= 0 and p.total_time_ms >= 0 for p in ps)
    mode = s.sync_mode
    if mode is SyncMode.PER_PARTICIPANT:
        for p in ps:
            assert p.initial_time_ms + p.increments_ms - p.total_time_ms == p.time_used_ms
    elif mode is SyncMode.PER_GROUP:
        banks: dict[str, list] = defaultdict(list)
        for p in ps:
            banks[bank_key(s, p)].append(p)
        for members in banks.values():
            assert len({m.total_time_ms for m in members}) == 1
            earned = sum(m.increments_ms for m in members)
            used = sum(m.time_used_ms for m in members)
            assert members[0].initial_time_ms + earned - members[0].total_time_ms == used
    else:
        assert all(p.total_time_ms == p.initial_time_ms and p.increments_ms == 0 for p in ps)
    used = sum(p.time_used_ms for p in ps)
    if mode is SyncMode.GLOBAL:
        assert s.global_remaining_ms is not None and s.global_remaining_ms >= 0
        assert s.total_time_ms - s.global_remaining_ms == used
    if mode is SyncMode.COUNT_UP and s.max_time_ms is not None:
        assert s.global_remaining_ms is not None and s.global_remaining_ms >= 0
        assert s.max_time_ms - s.global_remaining_ms == used
    if mode is SyncMode.PER_CYCLE:
        assert 0 <= s.turn_elapsed_ms <= (s.time_per_cycle_ms or 0)
    assert (s.active_index is None) == (s.status in TERMINAL or s.status is Status.PENDING)
    if s.active is not None:
        assert not s.active.has_expired
    assert all(p.time_remaining_ms >= 0 for p in view(s, now).participants)


def simulate(sc: Scenario, *, check_tick: bool = False, check_codec: bool = False) -> None:
    """Run the scenario, asserting the per-command contract and the invariants after each step."""
    now = T0
    first = apply(None, sc.create, now)
    state = first.state
    assert state is not None and state.version == 1
    oracle = Oracle()
    exact = True

    def accept(r: Any, before: Session, cmd: Any) -> Session:
        if r.replayed or (isinstance(cmd, Tick) and not r.events):
            assert r.state is before and not r.changed
            return before
        types = [e.type for e in r.events]
        assert r.events and len(types) == len(set(types))  # audit key (version, type) is unique
        assert r.state.version == before.version + 1
        assert all(e.version == r.state.version for e in r.events)
        assert r.outcome["version"] == r.state.version
        for e in r.events:
            oracle.feed(e)
        return r.state

    def check(s: Session) -> None:
        _invariants(s, now)
        for p in s.participants:
            if exact:
                assert p.time_used_ms == oracle.charged[p.participant_id]
            else:
                assert p.time_used_ms <= oracle.charged[p.participant_id]
        if check_codec:
            assert decode(encode(s)) == s
        if check_tick:
            nd = next_deadline(s)
            if nd is not None:
                assert not apply(s, Tick(), nd - 1).changed
                assert apply(s, Tick(), nd).changed
            elif s.status is Status.RUNNING:
                assert not apply(s, Tick(), now + 10**9).changed

    for e in first.events:
        oracle.feed(e)
    check(state)
    for gap, cmd in sc.steps:
        now += gap
        if sc.actor_ticks:
            while (nd := next_deadline(state)) is not None and nd <= now:
                tick = apply(state, Tick(), nd)
                assert tick.changed  # else the deadline is a lie (and this loop never ends)
                state = accept(tick, state, Tick())
                check(state)
        else:
            nd = next_deadline(state)
            exact = exact and (nd is None or nd > now or isinstance(cmd, Tick))
        before = encode(state)
        try:
            r = apply(state, cmd, now)
        except KairosError:
            assert encode(state) == before  # a rejected command changed nothing
            continue
        assert encode(state) == before  # an accepted one did not touch its input either
        state = accept(r, state, cmd)
        check(state)


@PROPERTY
@given(scenarios())
def test_time_is_conserved_and_nothing_goes_negative(sc: Scenario) -> None:
    simulate(sc)


@PROPERTY
@given(scenarios())
def test_tick_at_next_deadline_changes_and_one_ms_earlier_does_not(sc: Scenario) -> None:
    simulate(sc, check_tick=True)


@PROPERTY
@given(scenarios())
def test_checkpoint_round_trip_is_exact(sc: Scenario) -> None:
    simulate(sc, check_codec=True)
