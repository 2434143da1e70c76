"""The pure transition function and the deadline/view rules. No I/O, no clock: `now_ms` comes in.

CONTRACT (other packages rely on it):
- `apply(state, command, now_ms) -> Result`. `state` is None only for `Create`. The input is never
  mutated. A rejected command raises a `kairos.errors.KairosError` and changes nothing.
- An accepted command whose `command_id` is already in `state.recent` returns
  `Result(state, [], replayed=True, outcome=<the stored outcome>)` with the state unchanged.
- An accepted command bumps `version` by exactly 1 and records its `command_id` (if any) in the
  idempotency window: an id is remembered at least `window_ms` (the `apply` argument, default
  `IDEMPOTENCY_WINDOW_MS`) and while it is among the last `IDEMPOTENCY_WINDOW` ids, within the
  size bound `IDEMPOTENCY_MAX` ids per session (past it the oldest go first); ids the router made
  up (`ROUTER_ID_PREFIX`) only while among the last `IDEMPOTENCY_WINDOW`.
- `Tick` applies every deadline that has passed at `now_ms`; when nothing is due it returns the
  same state with no events (`changed` False) and no version bump.
- `Delete` returns `state=None` with a `session_deleted` event.

Refinement (additive): one command never emits two events of the same type, because the audit
log is keyed on (session_id, version, event type). So a command ends at most one turn by a
deadline; if further deadlines were also missed (an actor down for longer than a whole turn),
they stay due: `next_deadline(result.state) <= now_ms`, and the caller ticks again. A scheduler
that sleeps `max(0, next_deadline - now)` does this by itself.

Every rule is described in docs/time-controls.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from kairos import events as ev
from kairos.commands import (
    Cancel,
    Command,
    Complete,
    Create,
    Delete,
    Pause,
    Resume,
    Start,
    Switch,
    Tick,
)
from kairos.draft import Draft
from kairos.errors import (
    Conflict,
    InvalidStateTransition,
    SessionExists,
    SessionNotFound,
    ValidationError,
)
from kairos.modes import (
    add_increment,
    bank_key,
    bank_members,
    charge,
    countdown,
    live_remaining,
    shown_remaining,
)
from kairos.session import (
    TERMINAL,
    ExpiryPolicy,
    Participant,
    Session,
    Status,
    SyncMode,
    Visibility,
)
from kairos.validate import validate_create

# The idempotency window. Every command id is remembered while it is among the last
# IDEMPOTENCY_WINDOW ids of its session, and at least `window_ms` after it was accepted (default
# 300 s, KAIROS_IDEMPOTENCY_WINDOW_S), as long as the session holds at most IDEMPOTENCY_MAX ids:
# the window travels in every checkpoint, so its size is bounded (~50 B per id). 128, not more:
# each checkpoint packs the whole window, and at 512 ids a busy session spent ~0.2 ms of CPU per
# command on it (a third of a WebSocket SWITCH); a retry comes seconds after its command, not
# after 128 newer ones.
IDEMPOTENCY_WINDOW = 64
IDEMPOTENCY_WINDOW_MS = 300_000
IDEMPOTENCY_MAX = 128
# Ids the router makes up for commands sent without one (so that its own retries are recognised)
# start with this; they are kept by count only (the last IDEMPOTENCY_WINDOW): their retries end
# within seconds, and a busy session without client keys then carries a window of 64, not 128.
ROUTER_ID_PREFIX = "~"


@dataclass(frozen=True, slots=True)
class Result:
    """What a transition produced. `outcome` is the small record kept for idempotent replays:
    {"version": int, "expired_participant_id": str | None}."""

    state: Session | None
    events: list[ev.Event] = field(default_factory=list)
    replayed: bool = False
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.events) and not self.replayed


def apply(state: Session | None, command: Command, now_ms: int, *,
          window_ms: int = IDEMPOTENCY_WINDOW_MS) -> Result:
    """Apply one command at `now_ms`; raise a KairosError if it is rejected. `window_ms`: how long
    command ids are remembered at least (see IDEMPOTENCY_WINDOW_MS)."""
    cid = command.command_id
    if state is not None and cid is not None and cid in state.recent:
        return Result(state, [], replayed=True, outcome=outcome_of(state.recent[cid]))
    if isinstance(command, Create):
        if state is not None:
            raise SessionExists(f"Session {state.session_id} already exists")
        return _create(command, now_ms)
    if state is None:
        raise SessionNotFound(getattr(command, "session_id", "") or "")
    if isinstance(command, Tick):
        return _tick(state, now_ms)
    if isinstance(command, Delete):
        version = state.version + 1
        event = ev.Event(ev.SESSION_DELETED, state.session_id, version, now_ms, None,
                         {"status": state.status.value})
        return Result(None, [event], outcome={"version": version, "expired_participant_id": None})
    handler = _HANDLERS[type(command)]
    d = Draft(state)
    handler(d, command, now_ms)
    return _accept(state, d, cid, now_ms, window_ms)


def next_deadline(state: Session) -> int | None:
    """The exact ms at which `apply(state, Tick(), t)` would change something, or None."""
    warn, expiry = _deadlines(state)
    if warn is None:
        return expiry
    return warn if expiry is None else min(warn, expiry)


def view(state: Session, now_ms: int) -> Session:
    """A copy with live times as of `now_ms`: each participant's `time_remaining_ms` is set
    (counting down for the active clock while running, frozen while paused); `total_time_ms` and
    `time_used_ms` stay as of the last change, as on the wire."""
    d = Draft(state)
    for j, remaining in enumerate(live_remaining(state, now_ms)):
        d.p(j).time_remaining_ms = remaining
    return d.s


# --- commands -------------------------------------------------------------------------------


def _create(cmd: Create, now_ms: int) -> Result:
    validate_create(cmd)
    mode = SyncMode(cmd.sync_mode)
    participants = [
        Participant(
            participant_id=p.participant_id,
            participant_index=p.participant_index if p.participant_index is not None else n,
            total_time_ms=p.total_time_ms,
            initial_time_ms=p.total_time_ms,
            group_id=p.group_id,
        )
        for n, p in enumerate(cmd.participants)
    ]
    if cmd.expiry_policy is not None:
        policy = ExpiryPolicy(cmd.expiry_policy)
    elif mode is SyncMode.PER_CYCLE:
        policy = ExpiryPolicy.AUTO_ADVANCE
    else:
        policy = ExpiryPolicy.END_SESSION
    total = cmd.total_time_ms
    if total is None:
        total = sum(p.total_time_ms for p in participants)
    shared: int | None = None
    if mode is SyncMode.GLOBAL:
        shared = total
    elif mode is SyncMode.COUNT_UP:
        shared = cmd.max_time_ms
    state = Session(
        session_id=cmd.session_id,
        sync_mode=mode,
        status=Status.PENDING,
        version=1,
        participants=participants,
        owner=cmd.owner,
        created_at_ms=now_ms,
        updated_at_ms=now_ms,
        total_time_ms=total,
        expiry_policy=policy,
        visibility=Visibility(cmd.visibility),
        time_per_cycle_ms=cmd.time_per_cycle_ms,
        increment_ms=cmd.increment_ms,
        max_time_ms=cmd.max_time_ms,
        time_warning_ms=cmd.time_warning_ms,
        metadata=cmd.metadata,
        global_remaining_ms=shared,
    )
    outcome = {"version": 1, "expired_participant_id": None}
    if cmd.command_id is not None:
        state.recent = {cmd.command_id: {**outcome, "at_ms": now_ms}}
    event = ev.Event(ev.SESSION_CREATED, state.session_id, 1, now_ms, None,
                     {"sync_mode": mode.value, "participant_count": len(participants),
                      "owner": cmd.owner})
    return Result(state, [event], outcome=outcome)


def _not(s: Session, wanted: str) -> InvalidStateTransition:
    return InvalidStateTransition(
        f"Session {s.session_id} not {wanted} (current status: {s.status.value})")


def _start(d: Draft, cmd: Start, now_ms: int) -> None:
    s = d.s
    if s.status is not Status.PENDING:
        raise _not(s, "pending")
    s.status = Status.RUNNING
    s.session_started_at_ms = now_ms
    _begin_turn(d, 0, now_ms)
    first = s.participants[0]
    d.emit(ev.SESSION_STARTED, now_ms, first.participant_id,
           time_remaining_ms=shown_remaining(s, first), cycle_number=1)
    _catch_up(d, now_ms)


def _switch(d: Draft, cmd: Switch, now_ms: int) -> None:
    s = d.s
    if s.status is not Status.RUNNING:
        raise _not(s, "running")
    target = None
    if cmd.next_participant_id is not None:
        target = _index_of(s, cmd.next_participant_id)
        if target is None:
            raise _invalid("next_participant_id", "is not a participant of this session",
                           "unknown_participant")
    # A deadline that already passed is applied first: a late switch cannot rescue a flag that
    # fell. If that ended the turn, the switch has nothing left to do and reports the expiry.
    if _catch_up(d, now_ms):
        return
    a = s.active_index
    assert a is not None
    prev = s.participants[a]
    expected = cmd.expected_active_participant_id
    if expected is not None and not _same_id(expected, prev.participant_id):
        raise Conflict(f"Participant {expected} is no longer active "
                       f"(active: {prev.participant_id})")
    if target is not None and s.participants[target].has_expired:
        raise _invalid("next_participant_id", "participant has expired", "participant_expired")
    charge(d, now_ms)
    elapsed = s.turn_elapsed_ms
    prev = d.p(a)
    prev.cycle_count += 1
    add_increment(d, a)
    nxt = target if target is not None else _next_index(s, a)
    assert nxt is not None  # the active participant itself is never expired here
    _begin_turn(d, nxt, now_ms)
    _switched(d, now_ms, prev, elapsed, prev.cycle_count, "switch")
    _catch_up(d, now_ms)


def _pause(d: Draft, cmd: Pause, now_ms: int) -> None:
    s = d.s
    if s.status is not Status.RUNNING:
        raise _not(s, "running")
    _catch_up(d, now_ms)
    if s.status is not Status.RUNNING:
        raise _not(s, "running")
    charge(d, now_ms)
    s.status = Status.PAUSED
    a = s.active
    assert a is not None
    d.emit(ev.SESSION_PAUSED, now_ms, a.participant_id, time_elapsed_ms=s.turn_elapsed_ms,
           time_remaining_ms=shown_remaining(s, a), cycle_number=a.cycle_count + 1)


def _resume(d: Draft, cmd: Resume, now_ms: int) -> None:
    s = d.s
    if s.status is not Status.PAUSED:
        raise _not(s, "paused")
    s.status = Status.RUNNING
    s.cycle_started_at_ms = now_ms
    a = s.active
    assert a is not None
    d.emit(ev.SESSION_RESUMED, now_ms, a.participant_id,
           time_remaining_ms=shown_remaining(s, a), cycle_number=a.cycle_count + 1)
    _catch_up(d, now_ms)


def _end(d: Draft, now_ms: int, status: Status, event_type: str) -> None:
    """Complete or cancel: from any status but a terminal one; a running clock is charged."""
    s = d.s
    if s.status in TERMINAL:
        raise InvalidStateTransition(
            f"Session {s.session_id} already ended (current status: {s.status.value})")
    active_id = None
    if s.status is Status.RUNNING:
        _catch_up(d, now_ms)
        if s.status in TERMINAL:
            raise InvalidStateTransition(
                f"Session {s.session_id} already ended (current status: {s.status.value})")
        charge(d, now_ms)
    if s.active is not None:
        active_id = s.active.participant_id
    _finish(d, status, now_ms)
    d.emit(event_type, now_ms, active_id, previous_participant_id=active_id)


def _complete(d: Draft, cmd: Complete, now_ms: int) -> None:
    _end(d, now_ms, Status.COMPLETED, ev.SESSION_COMPLETED)


def _cancel(d: Draft, cmd: Cancel, now_ms: int) -> None:
    _end(d, now_ms, Status.CANCELLED, ev.SESSION_CANCELLED)


_HANDLERS: dict[type, Any] = {
    Start: _start,
    Switch: _switch,
    Pause: _pause,
    Resume: _resume,
    Complete: _complete,
    Cancel: _cancel,
}


def _tick(state: Session, now_ms: int) -> Result:
    if state.status is not Status.RUNNING:
        return Result(state, [], outcome=_unchanged(state))
    d = Draft(state)
    _catch_up(d, now_ms)
    if not d.has_events:
        return Result(state, [], outcome=_unchanged(state))
    return _accept(state, d, None, now_ms, 0)


def _unchanged(state: Session) -> dict[str, Any]:
    return {"version": state.version, "expired_participant_id": None}


def _accept(old: Session, d: Draft, command_id: str | None, now_ms: int, window_ms: int) -> Result:
    s = d.s
    s.version = old.version + 1
    s.updated_at_ms = now_ms
    outcome = {"version": s.version, "expired_participant_id": d.expired_participant_id}
    if command_id is not None:
        recent = dict(old.recent)
        recent[command_id] = {**outcome, "at_ms": now_ms}
        _forget_old_ids(recent, now_ms, window_ms)
        s.recent = recent
    return Result(s, d.events(s.session_id, s.version), outcome=outcome)


def outcome_of(remembered: dict[str, Any]) -> dict[str, Any]:
    """The outcome a replay answers, from an entry of `Session.recent` (without its `at_ms`)."""
    return {k: v for k, v in remembered.items() if k != "at_ms"}


def command_id_of(state: Session) -> str | None:
    """The id of the command that produced `state.version`, if it carried one."""
    if not state.recent:
        return None
    cid = next(reversed(state.recent))
    return cid if state.recent[cid].get("version") == state.version else None


def _forget_old_ids(recent: dict[str, dict], now_ms: int, window_ms: int) -> None:
    """Drop ids older than the last IDEMPOTENCY_WINDOW: the oldest past IDEMPOTENCY_MAX, and any
    remembered `window_ms` already (or made up by the router, or without a time).

    Called once per accepted id on a window that was already pruned, so only two places can hold
    something to drop: the front (ids now past the bound or past `window_ms`: accept times rise
    with insertion order, so those form a prefix) and the id that just left the last
    IDEMPOTENCY_WINDOW. Work per command is constant instead of the window's size. A window not pruned this way (an
    older checkpoint, times that went back) still shrinks to the bound at once and to its rule
    within one `window_ms`, as its front expires."""
    beyond = len(recent) - IDEMPOTENCY_WINDOW
    if beyond <= 0:
        return
    over = len(recent) - IDEMPOTENCY_MAX

    def stale(cid: str) -> bool:
        at = recent[cid].get("at_ms")
        return at is None or at + window_ms <= now_ms or cid.startswith(ROUTER_ID_PREFIX)

    left = next(islice(reversed(recent), IDEMPOTENCY_WINDOW, None))  # just left the last WINDOW
    while beyond > 1:  # the front, older than `left`
        cid = next(iter(recent))
        if over <= 0 and not stale(cid):
            break
        del recent[cid]
        over, beyond = over - 1, beyond - 1
    if over > 0 or stale(left):
        del recent[left]


# --- deadlines -------------------------------------------------------------------------------


def _deadlines(s: Session) -> tuple[int | None, int | None]:
    """(warning deadline, turn-ending deadline) of a running session, each None if there is none."""
    if s.status is not Status.RUNNING or s.active_index is None or s.cycle_started_at_ms is None:
        return None, None
    left = countdown(s)
    if left is None:
        return None, None
    start = s.cycle_started_at_ms
    warn = None
    w = s.time_warning_ms
    # With left == 0 the clock is already at zero: that is the expiry, not a warning.
    if w and not s.warned and left > 0:
        warn = start + max(0, left - w)
    return warn, start + left


def _catch_up(d: Draft, now_ms: int) -> bool:
    """Apply the deadlines due at `now_ms` (a warning, then at most one turn end, then the next
    turn's warning); return True if a turn was ended."""
    ended = False
    while True:
        warn, expiry = _deadlines(d.s)
        if warn is not None and warn <= now_ms and not d.emitted(ev.TIME_WARNING):
            _warning_step(d, warn)
        elif expiry is not None and expiry <= now_ms and not ended:
            _expiry_step(d, expiry)
            ended = True
        else:
            return ended


def _warning_step(d: Draft, at_ms: int) -> None:
    s = d.s
    a = s.active
    assert a is not None and s.cycle_started_at_ms is not None
    left = countdown(s) or 0
    s.warned = True
    d.emit(ev.TIME_WARNING, at_ms, a.participant_id,
           time_remaining_ms=left - (at_ms - s.cycle_started_at_ms),
           time_warning_ms=s.time_warning_ms, cycle_number=a.cycle_count + 1)


def _expiry_step(d: Draft, at_ms: int) -> None:
    """The active clock reached zero at `at_ms`: time out the turn or expire the participant."""
    s = d.s
    i = s.active_index
    assert i is not None
    charge(d, at_ms)
    elapsed = s.turn_elapsed_ms
    p = d.p(i)
    if s.expiry_policy is ExpiryPolicy.AUTO_ADVANCE and s.sync_mode is SyncMode.PER_CYCLE:
        p.cycle_count += 1
        nxt = _next_index(s, i)
        assert nxt is not None
        d.emit(ev.TURN_TIMED_OUT, at_ms, p.participant_id, time_elapsed_ms=elapsed,
               time_remaining_ms=0, cycle_number=p.cycle_count,
               next_participant_id=s.participants[nxt].participant_id)
        _begin_turn(d, nxt, at_ms)
        _switched(d, at_ms, p, elapsed, p.cycle_count, "turn_timed_out")
        return
    expired = _expire_members(d, i)
    d.expired_participant_id = p.participant_id
    data: dict[str, Any] = {"time_elapsed_ms": elapsed, "time_remaining_ms": 0,
                            "cycle_number": p.cycle_count + 1}
    if len(expired) > 1:
        data["group_id"] = p.group_id
        data["expired_participant_ids"] = expired
    d.emit(ev.PARTICIPANT_EXPIRED, at_ms, p.participant_id, **data)
    skip = s.expiry_policy is ExpiryPolicy.SKIP_PARTICIPANT and s.sync_mode not in (
        SyncMode.GLOBAL, SyncMode.COUNT_UP)
    if skip and _clocks_left(s) >= 2:
        nxt = _next_index(s, i)
        assert nxt is not None
        _begin_turn(d, nxt, at_ms)
        _switched(d, at_ms, p, elapsed, p.cycle_count + 1, "participant_expired")
        return
    _finish(d, Status.EXPIRED, at_ms)
    reason = "max_time_reached" if s.sync_mode is SyncMode.COUNT_UP else "time_expired"
    d.emit(ev.SESSION_EXPIRED, at_ms, p.participant_id, previous_participant_id=p.participant_id,
           reason=reason)


def _expire_members(d: Draft, index: int) -> list[str]:
    """Mark who ran out: the active participant, or every member of its group (shared bank)."""
    s = d.s
    members = bank_members(s, index)
    for j in members:
        d.p(j).has_expired = True
    return [s.participants[j].participant_id for j in members]


def _clocks_left(s: Session) -> int:
    """How many distinct clocks (participants, or groups in per_group) still have time."""
    return len({bank_key(s, p) for p in s.participants if not p.has_expired})


# --- helpers ---------------------------------------------------------------------------------


def _begin_turn(d: Draft, index: int, at_ms: int) -> None:
    s = d.s
    s.active_index = index
    s.cycle_started_at_ms = at_ms
    s.turn_elapsed_ms = 0
    s.warned = False


def _switched(d: Draft, at_ms: int, prev: Participant, elapsed: int, cycle_number: int,
              reason: str) -> None:
    """The cycle_switched event, once the new turn has begun: it concerns the new active
    participant (`time_remaining_ms` is theirs, for a "your turn" push); the previous one's turn
    is described by `previous_*`, `time_elapsed_ms` and `cycle_number`."""
    s = d.s
    new = s.active
    assert new is not None
    d.emit(ev.CYCLE_SWITCHED, at_ms, new.participant_id,
           previous_participant_id=prev.participant_id, time_elapsed_ms=elapsed,
           time_remaining_ms=shown_remaining(s, new),
           previous_time_remaining_ms=shown_remaining(s, prev), cycle_number=cycle_number,
           reason=reason)


def _finish(d: Draft, status: Status, at_ms: int) -> None:
    s = d.s
    s.status = status
    s.session_completed_at_ms = at_ms
    s.active_index = None
    s.warned = False


def _next_index(s: Session, after: int) -> int | None:
    """The next participant in array (rotation) order after `after` who has not expired."""
    n = len(s.participants)
    for k in range(1, n + 1):
        j = (after + k) % n
        if not s.participants[j].has_expired:
            return j
    return None


def _same_id(a: str, b: str) -> bool:
    return a == b or a.lower() == b.lower()


def _index_of(s: Session, participant_id: str) -> int | None:
    for j, p in enumerate(s.participants):
        if _same_id(p.participant_id, participant_id):
            return j
    return None


def _invalid(field_name: str, message: str, code: str) -> ValidationError:
    return ValidationError("Request validation failed",
                           details=[{"field": field_name, "message": message, "code": code}])
