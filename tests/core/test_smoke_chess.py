"""A worked chess game, number for number, through the core and the wire form."""

from __future__ import annotations

import json

from kairos import Start, Switch, Tick, apply, decode, encode, next_deadline
from kairos.wire import parse_iso_ms, session_json, switch_result_json, update_message

from .helpers import SID, P, make_create

CREATED = parse_iso_ms("2026-11-28T21:04:05.123Z")
STARTED = parse_iso_ms("2026-11-28T21:04:07.000Z")


def _chess():
    return make_create(total_time_ms=600_000, increment_ms=3000, time_warning_ms=10_000)


def test_create_body_matches_the_example_byte_for_byte_in_shape() -> None:
    r = apply(None, _chess(), CREATED)
    body = session_json(r.state, CREATED)
    expected = {
        "session_id": SID, "sync_mode": "per_participant", "status": "pending", "version": 1,
        "participants": [
            {"participant_id": P[i], "participant_index": i, "total_time_ms": 300000,
             "time_used_ms": 0, "time_remaining_ms": 300000, "cycle_count": 0,
             "is_active": False, "has_expired": False} for i in range(2)],
        "active_participant_id": None, "total_time_ms": 600000, "time_per_cycle_ms": None,
        "cycle_started_at": None, "session_started_at": None, "session_completed_at": None,
        "increment_ms": 3000, "created_at": "2026-11-28T21:04:05.123Z",
        "updated_at": "2026-11-28T21:04:05.123Z", "server_time_ms": 1795899845123,
        "expiry_policy": "end_session", "time_warning_ms": 10000, "visibility": "private",
        "owner": "host-1"}
    assert json.dumps(body) == json.dumps(expected)  # same keys, same order, same values


def test_start_then_live_read_then_switch_charges_and_adds_increment() -> None:
    s = apply(None, _chess(), CREATED).state
    s = apply(s, Start(), STARTED).state
    body = session_json(s, STARTED)
    assert (body["status"], body["version"]) == ("running", 2)
    assert body["cycle_started_at"] == body["session_started_at"] == "2026-11-28T21:04:07.000Z"
    live = session_json(s, STARTED + 2500)["participants"][0]
    assert (live["total_time_ms"], live["time_remaining_ms"]) == (300000, 297500)
    r = apply(s, Switch(), STARTED + 4200)
    out = switch_result_json(r.state, STARTED + 4200, r.outcome["expired_participant_id"])
    assert list(out) == ["session_id", "active_participant_id", "cycle_started_at",
                         "participants", "status", "version", "server_time_ms"]
    assert out["active_participant_id"] == P[1]
    assert out["cycle_started_at"] == "2026-11-28T21:04:11.200Z"
    first, second = out["participants"]
    assert (first["total_time_ms"], first["time_used_ms"], first["time_remaining_ms"],
            first["cycle_count"], first["is_active"]) == (298800, 4200, 298800, 1, False)
    assert (second["total_time_ms"], second["is_active"]) == (300000, True)
    assert (out["version"], out["server_time_ms"]) == (3, 1795899851200)


def test_flag_falls_by_tick_at_exact_deadline() -> None:
    s = apply(None, _chess(), CREATED).state
    s = apply(s, Start(), STARTED).state
    s = apply(s, Switch(), STARTED + 4200).state
    warn_at = next_deadline(s)
    assert warn_at == parse_iso_ms("2026-11-28T21:09:01.200Z")
    s = apply(s, Tick(), warn_at).state
    flag_at = next_deadline(s)
    assert flag_at == parse_iso_ms("2026-11-28T21:09:11.200Z")
    r = apply(s, Tick(), flag_at)
    body = session_json(r.state, flag_at + 1)
    assert body["status"] == "expired"
    assert body["session_completed_at"] == "2026-11-28T21:09:11.200Z"
    loser = body["participants"][1]
    assert (loser["has_expired"], loser["total_time_ms"], loser["time_remaining_ms"]) == (
        True, 0, 0)
    msg = json.loads(update_message(r.state, r.events, flag_at, SID))
    assert msg["expired_participant_id"] == P[1]
    assert [e["type"] for e in msg["events"]] == ["participant_expired", "session_expired"]
    assert decode(encode(r.state)) == r.state
