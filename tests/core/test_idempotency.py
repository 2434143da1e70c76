"""The idempotency window: replays return the first outcome and survive a checkpoint."""

from __future__ import annotations

import pytest

from kairos import Delete, Pause, Start, Switch, Tick, apply, decode, encode
from kairos.errors import InvalidStateTransition
from kairos.rules import IDEMPOTENCY_WINDOW

from .helpers import T0, P, make_create

S = T0 + 1000


def _started(**kw):
    s = apply(None, make_create(command_id="create-1", **kw), T0).state
    return apply(s, Start(command_id="start-1"), S).state


def test_replayed_command_returns_its_first_outcome_and_changes_nothing() -> None:
    s = _started()
    first = apply(s, Switch(command_id="sw-1"), S + 1000)
    again = apply(first.state, Switch(command_id="sw-1"), S + 9000)
    assert again.replayed and not again.changed and again.events == []
    assert again.state is first.state
    assert again.outcome == first.outcome == {"version": 3, "expired_participant_id": None}


def test_replayed_expiry_outcome_keeps_the_expired_participant() -> None:
    s = _started(bank=2000)
    first = apply(s, Switch(command_id="late"), S + 2500)
    assert first.outcome["expired_participant_id"] == P[0]
    restored = decode(encode(first.state))
    assert apply(restored, Switch(command_id="late"), S + 3000).outcome == first.outcome


def test_replay_wins_over_the_current_status() -> None:
    s = _started()
    s = apply(s, Pause(command_id="p"), S + 10).state
    r = apply(s, Start(command_id="start-1"), S + 20)  # would be refused if not a replay
    assert r.replayed and r.outcome["version"] == 2
    assert apply(s, make_create(command_id="create-1"), S + 30).outcome["version"] == 1


def test_rejected_command_is_not_remembered() -> None:
    s = _started()
    with pytest.raises(InvalidStateTransition):
        apply(s, Start(command_id="x"), S + 10)
    assert "x" not in s.recent


def test_window_keeps_the_last_64_ids_oldest_evicted_first() -> None:
    s = _started()
    now = S
    for n in range(IDEMPOTENCY_WINDOW + 5):
        now += 100
        s = apply(s, Switch(command_id=f"c{n}"), now).state
    assert len(s.recent) == IDEMPOTENCY_WINDOW
    assert list(s.recent)[0] == "c5" and list(s.recent)[-1] == f"c{IDEMPOTENCY_WINDOW + 4}"
    assert list(decode(encode(s)).recent) == list(s.recent)
    assert not apply(s, Switch(command_id="c4"), now + 100).replayed


def test_tick_and_delete_outcomes() -> None:
    s = _started(bank=2000)
    assert apply(s, Tick(), S + 2000).outcome == {"version": 3, "expired_participant_id": P[0]}
    assert apply(s, Delete(command_id="d"), S).outcome == {"version": 3,
                                                           "expired_participant_id": None}
