"""The five time controls: which clock the active turn drains, how time is charged and credited.

Each mode answers three questions: how much time is left on the clock the active turn is running
(`countdown`), who pays for elapsed time (`charge`), and what a participant's remaining time is
as shown to clients (`live_remaining`). See docs/time-controls.md for the rules in prose.
"""

from __future__ import annotations

from kairos.draft import Draft
from kairos.session import Participant, Session, Status, SyncMode

_BANK_MODES = (SyncMode.PER_PARTICIPANT, SyncMode.PER_GROUP)
# Modes whose single countdown (or cap) lives in `Session.global_remaining_ms`.
_SHARED_CLOCK_MODES = (SyncMode.GLOBAL, SyncMode.COUNT_UP)


def bank_key(state: Session, p: Participant) -> str:
    """The bank a participant draws from: its group in `per_group` (if it has one), else itself."""
    if state.sync_mode is SyncMode.PER_GROUP and p.group_id is not None:
        return p.group_id
    return p.participant_id


def bank_members(state: Session, index: int) -> list[int]:
    """Indexes of every participant sharing the bank of the participant at `index`."""
    if state.sync_mode is not SyncMode.PER_GROUP or state.participants[index].group_id is None:
        return [index]
    key = state.participants[index].group_id
    return [j for j, q in enumerate(state.participants) if q.group_id == key]


def countdown(state: Session) -> int | None:
    """Time left on the clock the active turn drains, as of the last change (None: no limit)."""
    a = state.active
    if a is None:
        return None
    mode = state.sync_mode
    if mode in _BANK_MODES:
        return a.total_time_ms
    if mode is SyncMode.PER_CYCLE:
        return (state.time_per_cycle_ms or 0) - state.turn_elapsed_ms
    return state.global_remaining_ms


def charge(d: Draft, upto_ms: int) -> int:
    """Charge the time since `cycle_started_at` to the active participant; return what was charged.

    Never charges more than the clock holds (so no bank goes negative) nor a negative amount
    (a clock that moved backwards after a failover charges nothing). Does not move
    `cycle_started_at`: callers set it when a new running segment begins.
    """
    s = d.s
    i = s.active_index
    assert i is not None and s.cycle_started_at_ms is not None
    elapsed = max(0, upto_ms - s.cycle_started_at_ms)
    left = countdown(s)
    if left is not None:
        elapsed = min(elapsed, left)
    if elapsed == 0:
        return 0
    p = d.p(i)
    p.time_used_ms += elapsed
    s.turn_elapsed_ms += elapsed
    if s.sync_mode in _BANK_MODES:
        for j in bank_members(s, i):
            d.p(j).total_time_ms -= elapsed
    elif s.sync_mode in _SHARED_CLOCK_MODES and s.global_remaining_ms is not None:
        s.global_remaining_ms -= elapsed
    return elapsed


def add_increment(d: Draft, index: int) -> None:
    """Fischer increment after a completed turn; only the bank modes have one."""
    s = d.s
    if not s.increment_ms or s.sync_mode not in _BANK_MODES:
        return
    d.p(index).increments_ms += s.increment_ms
    for j in bank_members(s, index):
        d.p(j).total_time_ms += s.increment_ms


def shown_remaining(state: Session, p: Participant) -> int:
    """A participant's remaining time at the last change, as a client sees it when idle."""
    if p.has_expired:
        return 0
    mode = state.sync_mode
    if mode in _BANK_MODES:
        return p.total_time_ms
    if mode is SyncMode.PER_CYCLE:
        if state.active is p:
            return (state.time_per_cycle_ms or 0) - state.turn_elapsed_ms
        return state.time_per_cycle_ms or 0
    if state.global_remaining_ms is not None:
        return state.global_remaining_ms
    return p.total_time_ms  # uncapped count_up: nothing counts down; show the declared value


def live_remaining(state: Session, now_ms: int) -> list[int]:
    """Every participant's remaining time as of `now_ms` (counts down only while running)."""
    out = [shown_remaining(state, p) for p in state.participants]
    i = state.active_index
    if state.status is not Status.RUNNING or i is None or state.cycle_started_at_ms is None:
        return out
    left = countdown(state)
    if left is None:
        return out
    elapsed = min(max(0, now_ms - state.cycle_started_at_ms), left)
    if state.sync_mode in _SHARED_CLOCK_MODES:
        affected = [j for j, p in enumerate(state.participants) if not p.has_expired]
    else:
        affected = bank_members(state, i)
    for j in affected:
        out[j] = max(0, out[j] - elapsed)
    return out
