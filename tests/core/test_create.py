"""Create: the session it builds, its defaults, and every validation rule of CreateSession (docs/api.md)."""

from __future__ import annotations

from typing import Any

import pytest

from kairos import ParticipantSpec, apply, encode
from kairos.errors import ValidationError
from kairos.session import ExpiryPolicy, Status

from .helpers import T0, G, P, make_create


def _details(**kw: Any) -> list[dict[str, str]]:
    mode = kw.pop("mode", "per_participant")
    with pytest.raises(ValidationError) as exc:
        apply(None, make_create(mode, **kw), T0)
    assert exc.value.message == "Request validation failed"
    assert exc.value.code == "VALIDATION_ERROR" and exc.value.status == 400
    return exc.value.details


def _specs(*banks: int, ids: list[str] | None = None, **kw: Any) -> tuple[ParticipantSpec, ...]:
    ids = ids or P
    return tuple(ParticipantSpec(ids[i], b, **kw) for i, b in enumerate(banks))


# (create overrides, expected {field, code} pairs)
INVALID = [
    ({"session_id": "not-a-uuid"}, [("session_id", "uuid_parsing")]),
    ({"sync_mode": "blitz"}, [("sync_mode", "enum")]),
    ({"participants": ()}, [("participants", "too_short")]),
    ({"participants": _specs(*[1000] * 1001, ids=[f"00000000-0000-4000-8000-{i:012d}"
                                                 for i in range(1001)])},
     [("participants", "too_long")]),
    ({"participants": "nope"}, [("participants", "list_type")]),
    ({"participants": _specs(999, 1000)}, [("participants.0.total_time_ms", "too_small")]),
    ({"participants": _specs(1000, 86_400_001)}, [("participants.1.total_time_ms", "too_big")]),
    ({"participants": _specs(1000, True)}, [("participants.1.total_time_ms", "int_type")]),
    ({"participants": _specs(1000, None)}, [("participants.1.total_time_ms", "missing")]),
    ({"participants": _specs(1000, 1000, ids=[P[0], P[0]])},
     [("participants.1.participant_id", "duplicate")]),
    ({"participants": _specs(1000, 1000, ids=[P[0], P[0].upper()])},
     [("participants.1.participant_id", "duplicate")]),
    ({"participants": _specs(1000, ids=["x"])}, [("participants.0.participant_id", "uuid_parsing")]),
    ({"participants": _specs(1000, participant_index=-1)},
     [("participants.0.participant_index", "too_small")]),
    ({"participants": _specs(1000, group_id="g")}, [("participants.0.group_id", "uuid_parsing")]),
    ({"total_time_ms": 999}, [("total_time_ms", "too_small")]),
    ({"mode": "global", "total_time_ms": None}, [("total_time_ms", "missing")]),
    ({"mode": "per_cycle", "time_per_cycle_ms": None}, [("time_per_cycle_ms", "missing")]),
    ({"time_per_cycle_ms": 86_400_001}, [("time_per_cycle_ms", "too_big")]),
    ({"increment_ms": -1}, [("increment_ms", "too_small")]),
    ({"increment_ms": 60_001}, [("increment_ms", "too_big")]),
    ({"max_time_ms": 500}, [("max_time_ms", "too_small")]),
    ({"time_warning_ms": -5}, [("time_warning_ms", "too_small")]),
    ({"time_warning_ms": 1.5}, [("time_warning_ms", "int_type")]),
    ({"expiry_policy": "explode"}, [("expiry_policy", "enum")]),
    ({"expiry_policy": "auto_advance"}, [("expiry_policy", "value_error")]),
    ({"visibility": "secret"}, [("visibility", "enum")]),
    ({"metadata": [1, 2]}, [("metadata", "dict_type")]),
    ({"metadata": {"blob": "x" * 10_240}}, [("metadata", "too_big")]),
    ({"metadata": {"f": object()}}, [("metadata", "value_error")]),
    ({"metadata": {"big": 2**70}}, [("metadata", "value_error")]),
    ({"owner": 7}, [("owner", "string_type")]),
    ({"mode": "per_group", "participants": (ParticipantSpec(P[0], 5000, group_id=G[0]),
                                            ParticipantSpec(P[1], 6000, group_id=G[0]))},
     [("participants.1.total_time_ms", "group_mismatch")]),
    ({"session_id": "x", "increment_ms": -1, "participants": _specs(1)},
     [("session_id", "uuid_parsing"), ("participants.0.total_time_ms", "too_small"),
      ("increment_ms", "too_small")]),
]


@pytest.mark.parametrize(("overrides", "expected"), INVALID)
def test_invalid_create_lists_every_problem_with_a_dotted_path(overrides: dict[str, Any],
                                                               expected: list) -> None:
    details = _details(**overrides)
    assert [(d["field"], d["code"]) for d in details] == expected
    assert all(d["message"] for d in details)


def test_too_small_message_matches_the_api_example() -> None:
    [detail] = _details(participants=_specs(999))
    assert detail == {"field": "participants.0.total_time_ms", "message": "must be at least 1000",
                      "code": "too_small"}


def test_create_builds_a_pending_version_1_session_with_defaults() -> None:
    r = apply(None, make_create(command_id="c1"), T0)
    s = r.state
    assert (s.status, s.version, s.created_at_ms, s.updated_at_ms) == (Status.PENDING, 1, T0, T0)
    assert s.expiry_policy is ExpiryPolicy.END_SESSION
    assert s.total_time_ms == 600_000  # defaults to the sum of the banks
    assert [p.participant_index for p in s.participants] == [0, 1]
    assert s.recent == {"c1": {"version": 1, "expired_participant_id": None, "at_ms": T0}}
    assert [(e.type, e.version, e.data["participant_count"]) for e in r.events] == [
        ("session_created", 1, 2)]


def test_per_cycle_defaults_to_auto_advance_and_accepts_it_explicitly() -> None:
    assert apply(None, make_create("per_cycle"), T0).state.expiry_policy is (
        ExpiryPolicy.AUTO_ADVANCE)
    s = apply(None, make_create("per_cycle", expiry_policy="auto_advance"), T0).state
    assert s.expiry_policy is ExpiryPolicy.AUTO_ADVANCE


def test_explicit_participant_index_and_group_are_kept() -> None:
    specs = (ParticipantSpec(P[0], 5000, participant_index=7, group_id=G[0]),
             ParticipantSpec(P[1], 5000, group_id=G[0]))
    s = apply(None, make_create("per_group", participants=specs), T0).state
    assert [(p.participant_index, p.group_id) for p in s.participants] == [(7, G[0]), (1, G[0])]


def test_a_thousand_participants_are_accepted_and_encode() -> None:
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(1000)]
    s = apply(None, make_create(participants=_specs(*[60_000] * 1000, ids=ids)), T0).state
    assert len(s.participants) == 1000 and encode(s)
