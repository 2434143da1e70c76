"""The fast paths of `kairos.wire` write exactly what the plain stdlib versions wrote.

`iso_ms` caches formatted seconds and `update_message` serialises with orjson (metadata spliced
in from the stdlib); both are compared byte for byte against the straightforward reference.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos import Start, Switch, apply
from kairos.wire import expired_participant_of, iso_ms, session_json, update_message

from .helpers import SID, T0, make_create


def _reference_iso(epoch_ms: int) -> str:
    seconds, millis = divmod(epoch_ms, 1000)
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


def _reference_message(state: Any, events: list, now: int) -> bytes:
    msg: dict[str, Any] = {"session_id": SID, "version": state.version, "server_time_ms": now,
                           "events": [e.to_dict() for e in events],
                           "state": session_json(state, now)}
    expired = expired_participant_of(events)
    if expired is not None:
        msg["expired_participant_id"] = expired
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


def _switched(**changes: Any) -> tuple[Any, list, int]:
    s = apply(apply(None, make_create(), T0).state, Start(), T0 + 1000).state
    s = dataclasses.replace(s, **changes)
    r = apply(s, Switch(), T0 + 2345)
    return r.state, r.events, T0 + 2400


@settings(max_examples=300, deadline=None)
@given(st.integers(-(10**13), 253_402_300_799_999))
def test_iso_ms_matches_strftime(ms: int) -> None:
    assert iso_ms(ms) == _reference_iso(ms)
    assert iso_ms(ms) == _reference_iso(ms)  # second call: served from the cache


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)))


@settings(max_examples=200, deadline=None)
@given(metadata=st.none() | st.dictionaries(st.text(), _JSON, max_size=5), owner=_TEXT,
       group=st.none() | _TEXT, big=st.booleans())
def test_update_message_bytes_match_the_stdlib(metadata: Any, owner: str, group: str | None,
                                               big: bool) -> None:
    state, events, now = _switched(metadata=metadata, owner=owner)
    p = state.participants
    p[0] = dataclasses.replace(p[0], group_id=group)
    if big:  # beyond 64 bits: orjson refuses, the stdlib path writes it
        p[1] = dataclasses.replace(p[1], participant_index=2**80)
    assert update_message(state, events, now, SID) == _reference_message(state, events, now)


def test_a_lone_surrogate_fails_as_it_always_did() -> None:
    state, events, now = _switched(owner="\ud800")
    with pytest.raises(UnicodeEncodeError):
        _reference_message(state, events, now)
    with pytest.raises(UnicodeEncodeError):
        update_message(state, events, now, SID)
