"""The idempotency window: replays return the first outcome and survive a checkpoint; an id is
remembered at least the window (injected as `window_ms`, times as `now_ms`) and while among the
last IDEMPOTENCY_WINDOW ids, within IDEMPOTENCY_MAX ids."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos import Delete, Pause, Resume, Start, Switch, Tick, apply, decode, encode
from kairos.errors import InvalidStateTransition
from kairos.rules import (
    IDEMPOTENCY_MAX,
    IDEMPOTENCY_WINDOW,
    IDEMPOTENCY_WINDOW_MS,
    ROUTER_ID_PREFIX,
)
from kairos.wire import remembered, session_from_json, session_json, update_message

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


def _switches(s, n: int, now: int, gap_ms: int, **kw):
    for k in range(n):
        now += gap_ms
        s = apply(s, Switch(command_id=f"c{k}"), now, **kw).state
    return s, now


def test_once_the_window_passed_the_last_64_ids_stay_oldest_evicted_first() -> None:
    s, now = _switches(_started(), IDEMPOTENCY_WINDOW + 5, S, 100, window_ms=1000)
    assert len(s.recent) == IDEMPOTENCY_WINDOW
    assert list(s.recent)[0] == "c5" and list(s.recent)[-1] == f"c{IDEMPOTENCY_WINDOW + 4}"
    assert list(decode(encode(s)).recent) == list(s.recent)
    assert not apply(s, Switch(command_id="c4"), now + 100).replayed


def test_an_id_is_remembered_for_the_whole_window_even_after_many_newer_ids() -> None:
    s = _started()
    first = apply(s, Switch(command_id="early"), S + 100)
    s, now = _switches(first.state, IDEMPOTENCY_MAX - 8, S + 100, 1000)  # 120 newer ids within 121 s
    again = apply(s, Switch(command_id="early"), S + 100 + IDEMPOTENCY_WINDOW_MS - 1)
    assert again.replayed and again.outcome == first.outcome
    # remembered through a checkpoint too
    assert apply(decode(encode(s)), Switch(command_id="early"), now + 1).replayed


def test_an_id_is_forgotten_once_the_window_passed_and_enough_newer_ids_came() -> None:
    s = apply(_started(), Switch(command_id="early"), S + 100).state
    s, now = _switches(s, IDEMPOTENCY_WINDOW, S + 100, 1000)
    s = apply(s, Switch(command_id="late"), S + 100 + IDEMPOTENCY_WINDOW_MS).state
    assert "early" not in s.recent and "c0" in s.recent
    assert len(s.recent) == IDEMPOTENCY_WINDOW + 1  # c0..c63 are younger than the window


def test_the_window_holds_at_most_IDEMPOTENCY_MAX_ids() -> None:
    s, _ = _switches(_started(), IDEMPOTENCY_MAX + 20, S, 10)
    assert len(s.recent) == IDEMPOTENCY_MAX
    assert list(s.recent)[0] == "c20"


def test_ids_made_up_by_the_router_are_kept_by_count_only() -> None:
    s = apply(_started(), Switch(command_id="client"), S + 100).state
    for k in range(IDEMPOTENCY_WINDOW + 10):
        s = apply(s, Switch(command_id=f"{ROUTER_ID_PREFIX}{k}"), S + 200 + k).state
    assert len(s.recent) == IDEMPOTENCY_WINDOW + 3  # create-1, start-1, client: still in the window
    assert list(s.recent)[3] == f"{ROUTER_ID_PREFIX}10"


@settings(max_examples=80, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 30_000), st.booleans()), min_size=1, max_size=150),
       window_ms=st.integers(0, 600_000))
def test_window_property(steps: list[tuple[int, bool]], window_ms: int) -> None:
    s, now, accepted = _started(), S, [("create-1", T0), ("start-1", S)]
    for k, (gap, routed) in enumerate(steps):
        now += gap
        cid = f"{ROUTER_ID_PREFIX if routed else ''}k{k}"
        s = apply(s, Switch(command_id=cid), now, window_ms=window_ms).state
        accepted.append((cid, now))
        kept = list(s.recent)
        assert len(kept) <= IDEMPOTENCY_MAX
        newest = [c for c, _ in accepted[-IDEMPOTENCY_WINDOW:]]
        young = [c for c, at in accepted[-IDEMPOTENCY_MAX:]
                 if at + window_ms > now and not c.startswith(ROUTER_ID_PREFIX)]
        assert set(newest) <= set(kept) and set(young) <= set(kept)
        assert len(kept) <= len(set(newest) | set(young))  # nothing else is kept
        assert kept == [c for c, _ in accepted if c in s.recent]  # oldest first
    assert decode(encode(s)) == s


def test_a_format_1_checkpoint_counts_its_ids_as_accepted_at_the_last_change() -> None:
    s = apply(_started(), Switch(command_id="sw"), S + 500).state
    t = list(msgpack.unpackb(encode(s), raw=False, strict_map_key=False))
    ids, versions, expired, _ages = t[23]
    t[0], t[23] = 1, [ids, versions, expired]
    old = decode(msgpack.packb(t, use_bin_type=True))
    assert old.recent["sw"] == {"version": 3, "expired_participant_id": None, "at_ms": S + 500}
    assert old.recent["create-1"]["at_ms"] == S + 500


def test_the_audit_copy_carries_the_window_so_a_restore_keeps_it() -> None:
    """Each update message names the command id that made its version; the audit stores it, and
    `remembered` + `session_from_json` rebuild the window from those messages."""
    import json

    s = _started(bank=2000)
    messages = []
    for now, cmd in ((S + 100, Pause(command_id="p")), (S + 200, Pause()), (S + 400, Resume(command_id="r"))):
        try:
            r = apply(s, cmd, now)
        except InvalidStateTransition:
            continue  # the second pause: refused, no message
        messages.append(json.loads(update_message(r.state, r.events, now, r.state.session_id)))
        s = r.state
    assert [m.get("command_id") for m in messages] == ["p", "r"]
    late = apply(s, Switch(command_id="late"), S + 5000)  # the flag fell: an expiry outcome
    messages.append(json.loads(update_message(late.state, late.events, S + 5000, s.session_id)))
    s = late.state
    window = remembered([(m["version"], m) for m in reversed(messages) if "command_id" in m])
    restored = session_from_json(messages[-1]["state"], window)
    assert {k: restored.recent[k] for k in ("p", "r", "late")} == {k: s.recent[k] for k in ("p", "r", "late")}
    assert apply(restored, Switch(command_id="late"), S + 9000).outcome == late.outcome
    assert session_json(restored, S + 9000) == session_json(s, S + 9000)


def test_tick_and_delete_outcomes() -> None:
    s = _started(bank=2000)
    assert apply(s, Tick(), S + 2000).outcome == {"version": 3, "expired_participant_id": P[0]}
    assert apply(s, Delete(command_id="d"), S).outcome == {"version": 3,
                                                           "expired_participant_id": None}


def test_a_window_not_pruned_as_it_grew_shrinks_to_the_bound_at_once_and_to_its_rule_within_the_window() -> None:
    # e.g. an older checkpoint: router ids and ids past the window anywhere, more than the bound
    s = _started(bank=10 * IDEMPOTENCY_WINDOW_MS)
    now = S + 10
    recent = {f"{ROUTER_ID_PREFIX}r{k}" if k % 3 == 0 else f"k{k}":
              {"version": 3, "expired_participant_id": None, "at_ms": now} for k in range(IDEMPOTENCY_MAX + 40)}
    s.recent = recent
    s = apply(s, Switch(command_id="next"), now + 1).state
    assert len(s.recent) <= IDEMPOTENCY_MAX
    s, now = _switches(s, 2, now + IDEMPOTENCY_WINDOW_MS, 1)
    assert len(s.recent) == IDEMPOTENCY_WINDOW  # everything older than the last 64 has expired
