"""Wire form (ISO times, omitted-vs-null, update message, restore from JSON) and the codec."""

from __future__ import annotations

import json

import msgpack
import pytest

from kairos import ParticipantSpec, Pause, Start, Switch, Tick, apply, decode, encode, view
from kairos.events import Event
from kairos.wire import (
    iso_ms,
    parse_iso_ms,
    session_from_json,
    session_json,
    switch_result_json,
    update_message,
)

from .helpers import SID, T0, G, P, make_create

S = T0 + 1000


@pytest.mark.parametrize(("ms", "text"), [
    (0, "1970-01-01T00:00:00.000Z"),
    (1795899845123, "2026-11-28T21:04:05.123Z"),
    (1795899847000, "2026-11-28T21:04:07.000Z"),
    (-1, "1969-12-31T23:59:59.999Z"),
])
def test_iso_ms_has_three_digits_and_z_and_parses_back(ms: int, text: str) -> None:
    assert iso_ms(ms) == text
    assert parse_iso_ms(text) == ms


@pytest.mark.parametrize(("text", "ms"), [
    ("2026-11-28T21:04:05.123+00:00", 1795899845123),
    ("2026-11-28T22:04:05.123+01:00", 1795899845123),
    ("2026-11-28T21:04:05.123456z", 1795899845123),
    ("2026-11-28T21:04:05", 1795899845000),
])
def test_parse_iso_ms_accepts_offsets_and_naive_utc(text: str, ms: int) -> None:
    assert parse_iso_ms(text) == ms


def test_optional_keys_appear_only_when_set() -> None:
    specs = (ParticipantSpec(P[0], 5000, group_id=G[0]), ParticipantSpec(P[1], 5000))
    s = apply(None, make_create("count_up", participants=specs, max_time_ms=9000,
                                metadata={"table": 4}, visibility="public"), T0).state
    body = session_json(s, T0)
    assert (body["max_time_ms"], body["metadata"], body["visibility"]) == (9000, {"table": 4},
                                                                           "public")
    assert "time_warning_ms" not in body
    assert body["participants"][0]["group_id"] == G[0]
    assert "group_id" not in body["participants"][1]
    bare = session_json(apply(None, make_create(), T0).state, T0)
    for key in ("max_time_ms", "metadata", "time_warning_ms"):
        assert key not in bare
    for key in ("active_participant_id", "time_per_cycle_ms", "cycle_started_at",
                "session_started_at", "session_completed_at"):
        assert bare[key] is None


def test_switch_result_has_expired_participant_only_after_an_expiry() -> None:
    s = apply(None, make_create(bank=2000), T0).state
    s = apply(s, Start(), S).state
    r = apply(s, Switch(), S + 3000)
    body = switch_result_json(r.state, S + 3000, r.outcome["expired_participant_id"])
    assert body["expired_participant_id"] == P[0] and body["status"] == "expired"
    assert body["active_participant_id"] is None


def test_update_message_carries_state_events_and_expiry() -> None:
    s = apply(None, make_create(bank=2000), T0).state
    s = apply(s, Start(), S).state
    r = apply(s, Tick(), S + 2000)
    raw = update_message(r.state, r.events, S + 2001, SID)
    assert isinstance(raw, bytes) and b", " not in raw and b": " not in raw
    msg = json.loads(raw)
    assert list(msg) == ["session_id", "version", "server_time_ms", "events", "state",
                         "expired_participant_id"]
    assert (msg["version"], msg["server_time_ms"], msg["expired_participant_id"]) == (
        3, S + 2001, P[0])
    assert msg["state"] == session_json(r.state, S + 2001)
    assert msg["events"][0] == r.events[0].to_dict()


def test_update_message_for_a_switch_and_a_delete() -> None:
    s = apply(apply(None, make_create(), T0).state, Start(), S).state
    r = apply(s, Switch(), S + 10)
    assert "expired_participant_id" not in json.loads(update_message(r.state, r.events, S, SID))
    deleted = Event("session_deleted", SID, 9, S)
    msg = json.loads(update_message(None, [deleted], S, SID))
    assert (msg["state"], msg["version"]) == (None, 9)
    assert json.loads(update_message(None, [], S, SID))["version"] == 0


def _roundtrip(state, now):
    return session_json(session_from_json(session_json(state, now)), now)


@pytest.mark.parametrize("mode", ["per_participant", "per_group", "per_cycle", "global",
                                  "count_up"])
def test_session_from_json_restores_what_the_wire_shows(mode: str) -> None:
    groups = [G[0], G[1], G[0]] if mode == "per_group" else None
    s = apply(None, make_create(mode, n=3, groups=groups, increment_ms=1000, max_time_ms=50_000,
                                time_warning_ms=100, metadata={"a": 1}), T0).state
    s = apply(s, Start(), S).state
    s = apply(s, Switch(), S + 3000).state
    s = apply(s, Switch(), S + 4000).state
    restored = session_from_json(session_json(s, S + 4500))
    assert session_json(restored, S + 4600) == session_json(s, S + 4600)
    for a, b in zip(restored.participants, s.participants, strict=True):
        assert (a.initial_time_ms, a.increments_ms) == (b.initial_time_ms, b.increments_ms)
    assert restored.global_remaining_ms == s.global_remaining_ms
    # the restored session keeps running by the same rules
    later = S + 4000 + 1234
    assert (session_json(apply(restored, Switch(), later).state, later)
            == session_json(apply(s, Switch(), later).state, later))


def test_session_from_json_approximations_are_the_documented_ones() -> None:
    s = apply(None, make_create("per_cycle", command_id="c"), T0).state
    s = apply(s, Start(), S).state
    s = apply(s, Pause(), S + 4000).state
    restored = session_from_json(session_json(s, S + 5000))
    assert restored.recent == {} and s.recent
    assert restored.turn_elapsed_ms == 0 and s.turn_elapsed_ms == 4000
    assert _roundtrip(s, S + 5000)["status"] == "paused"


def test_codec_round_trips_every_field_exactly() -> None:
    s = apply(None, make_create("per_group", n=3, groups=[G[0], None, G[0]], time_warning_ms=10,
                                metadata={"nested": [1, 2.5, {"k": None}]}, command_id="c"),
              T0).state
    s = apply(s, Start(command_id="s"), S).state
    s = apply(s, Pause(), S + 77).state
    assert decode(encode(s)) == s
    live = view(s, S + 99)
    assert decode(encode(live)) == live


def test_codec_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        decode(msgpack.packb([99]))


def test_codec_keeps_an_outcome_of_another_shape_whole() -> None:
    s = apply(None, make_create(), T0).state
    s.recent = {"a": {"version": 1, "expired_participant_id": None}, "b": {"other": [1]}}
    assert decode(encode(s)).recent == s.recent
    assert list(decode(encode(s)).recent) == ["a", "b"]
