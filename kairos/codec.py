"""Checkpoint codec: Session <-> compact bytes, exact round trip.

Format: msgpack of a positional list (no key names), tagged with a format number so a future
layout can still read old checkpoints. Participants are positional rows. The idempotency window
is packed as columns (command ids oldest first, versions, expired ids, and how long before
`updated_at_ms` each was accepted), so its eviction order and times survive (outcomes of any
other shape are kept whole). Format 1 (no times) is still read: its ids count as accepted at the
session's last change.
"""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter, sub

import msgpack

from kairos.session import ExpiryPolicy, Participant, Session, Status, SyncMode, Visibility

FORMAT = 2
_READABLE = (1, 2)

_VERSION, _EXPIRED, _AT = itemgetter("version"), itemgetter("expired_participant_id"), itemgetter("at_ms")
_MODES = {m.value: m for m in SyncMode}
_STATUSES = {m.value: m for m in Status}
_POLICIES = {m.value: m for m in ExpiryPolicy}
_VISIBILITIES = {m.value: m for m in Visibility}


def encode(state: Session) -> bytes:
    """Serialise the full state (including the idempotency window) to bytes."""
    s = state
    rows = [
        (p.participant_id, p.participant_index, p.total_time_ms, p.initial_time_ms,
         p.time_used_ms, p.cycle_count, p.has_expired, p.group_id, p.increments_ms,
         p.time_remaining_ms)
        for p in s.participants
    ]
    return msgpack.packb(
        (
            FORMAT, s.session_id, s.sync_mode.value, s.status.value, s.version, rows, s.owner,
            s.created_at_ms, s.updated_at_ms, s.total_time_ms, s.expiry_policy.value,
            s.visibility.value, s.active_index, s.time_per_cycle_ms, s.increment_ms,
            s.max_time_ms, s.time_warning_ms, s.metadata, s.cycle_started_at_ms,
            s.session_started_at_ms, s.session_completed_at_ms, s.global_remaining_ms, s.warned,
            _pack_recent(s.recent, s.updated_at_ms), s.turn_elapsed_ms,
        ),
        use_bin_type=True,
    )


def decode(data: bytes) -> Session:
    """Rebuild the state written by `encode`; raises ValueError on an unknown format."""
    t = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not t or t[0] not in _READABLE:
        raise ValueError(f"unknown checkpoint format {t[0] if t else None!r}")
    (_, session_id, mode, status, version, rows, owner, created, updated, total, policy,
     visibility, active_index, tpc, inc, max_time, warn_ms, metadata, cycle_at, started_at,
     completed_at, shared, warned, recent, turn_elapsed) = t
    return Session(
        session_id=session_id,
        sync_mode=_MODES[mode],
        status=_STATUSES[status],
        version=version,
        participants=[Participant(*row) for row in rows],
        owner=owner,
        created_at_ms=created,
        updated_at_ms=updated,
        total_time_ms=total,
        expiry_policy=_POLICIES[policy],
        visibility=_VISIBILITIES[visibility],
        active_index=active_index,
        time_per_cycle_ms=tpc,
        increment_ms=inc,
        max_time_ms=max_time,
        time_warning_ms=warn_ms,
        metadata=metadata,
        cycle_started_at_ms=cycle_at,
        session_started_at_ms=started_at,
        session_completed_at_ms=completed_at,
        global_remaining_ms=shared,
        warned=warned,
        recent=_unpack_recent(recent, updated),
        turn_elapsed_ms=turn_elapsed,
    )


def _pack_recent(recent: dict[str, dict], updated_at_ms: int) -> list:
    """[command_ids, versions, expired_ids, ages] when every entry has the usual keys (the common
    case, packed as flat columns; age = updated_at_ms - at_ms, a small number), else
    [[command_id, entry], ...] kept whole. Built with map/itemgetter: this runs on every
    checkpoint, over up to IDEMPOTENCY_MAX ids."""
    entries = recent.values()
    if entries and set(map(len, entries)) == {3}:
        try:
            versions = list(map(_VERSION, entries))
            expired = list(map(_EXPIRED, entries))
            ats = list(map(_AT, entries))
        except KeyError:  # three keys, not these
            pass
        else:
            return [list(recent), versions, expired, list(map(sub, repeat(updated_at_ms), ats))]
    elif not entries:
        return [[], [], [], []]
    return [list(recent.items())]


def _unpack_recent(packed: list, updated_at_ms: int) -> dict[str, dict]:
    if len(packed) == 1:
        return dict(packed[0])
    if len(packed) == 3:  # format 1: no times
        ids, versions, expired = packed
        ages = [0] * len(ids)
    else:
        ids, versions, expired, ages = packed
    return {
        cid: {"version": v, "expired_participant_id": e, "at_ms": updated_at_ms - age}
        for cid, v, e, age in zip(ids, versions, expired, ages, strict=True)
    }
