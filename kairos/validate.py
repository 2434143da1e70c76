"""Validation of a Create command, in the core, so a session is sound whatever the edge checked.

Errors are collected (not raised one by one) into the API's `details` list of
`{field, message, code}` with dotted paths; codes follow pydantic's names where one exists.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgpack

from kairos.commands import Create
from kairos.errors import ValidationError
from kairos.session import ExpiryPolicy, SyncMode, Visibility

MIN_TIME_MS = 1_000
MAX_TIME_MS = 86_400_000
MAX_INCREMENT_MS = 60_000
MAX_PARTICIPANTS = 1_000
MAX_METADATA_BYTES = 10 * 1024


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_uuid(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        uuid.UUID(v)
    except ValueError:
        return False
    return True


class _Errors:
    def __init__(self) -> None:
        self.details: list[dict[str, str]] = []

    def add(self, field: str, message: str, code: str) -> None:
        self.details.append({"field": field, "message": message, "code": code})

    def int_range(self, field: str, v: Any, lo: int, hi: int | None, *, required: bool) -> None:
        if v is None:
            if required:
                self.add(field, "field required", "missing")
        elif not _is_int(v):
            self.add(field, "must be an integer", "int_type")
        elif v < lo:
            self.add(field, f"must be at least {lo}", "too_small")
        elif hi is not None and v > hi:
            self.add(field, f"must be at most {hi}", "too_big")

    def uuid(self, field: str, v: Any) -> None:
        if not _is_uuid(v):
            self.add(field, "must be a UUID", "uuid_parsing")

    def choice(self, field: str, v: Any, allowed: type) -> None:
        values = [m.value for m in allowed]
        if v not in values:
            self.add(field, f"must be one of {', '.join(values)}", "enum")


def validate_create(cmd: Create) -> None:
    """Raise ValidationError listing every problem of `cmd`, or return if it is valid."""
    e = _Errors()
    e.uuid("session_id", cmd.session_id)
    e.choice("sync_mode", cmd.sync_mode, SyncMode)
    if not isinstance(cmd.owner, str):
        e.add("owner", "must be a string", "string_type")
    _participants(e, cmd)
    e.int_range("total_time_ms", cmd.total_time_ms, MIN_TIME_MS, MAX_TIME_MS,
                required=cmd.sync_mode == SyncMode.GLOBAL)
    e.int_range("time_per_cycle_ms", cmd.time_per_cycle_ms, MIN_TIME_MS, MAX_TIME_MS,
                required=cmd.sync_mode == SyncMode.PER_CYCLE)
    e.int_range("increment_ms", cmd.increment_ms, 0, MAX_INCREMENT_MS, required=True)
    e.int_range("max_time_ms", cmd.max_time_ms, MIN_TIME_MS, MAX_TIME_MS, required=False)
    e.int_range("time_warning_ms", cmd.time_warning_ms, 0, MAX_TIME_MS, required=False)
    if cmd.expiry_policy is not None:
        e.choice("expiry_policy", cmd.expiry_policy, ExpiryPolicy)
        if cmd.expiry_policy == ExpiryPolicy.AUTO_ADVANCE and cmd.sync_mode != SyncMode.PER_CYCLE:
            e.add("expiry_policy", "auto_advance applies only to per_cycle sessions", "value_error")
    e.choice("visibility", cmd.visibility, Visibility)
    _metadata(e, cmd.metadata)
    if e.details:
        raise ValidationError("Request validation failed", details=e.details)


def _participants(e: _Errors, cmd: Create) -> None:
    ps = cmd.participants
    if not isinstance(ps, (tuple, list)):
        e.add("participants", "must be a list", "list_type")
        return
    if len(ps) < 1:
        e.add("participants", "must have at least 1 item", "too_short")
    elif len(ps) > MAX_PARTICIPANTS:
        e.add("participants", f"must have at most {MAX_PARTICIPANTS} items", "too_long")
        return
    seen: set[str] = set()
    group_bank: dict[str, int] = {}
    for n, p in enumerate(ps):
        at = f"participants.{n}"
        e.uuid(f"{at}.participant_id", p.participant_id)
        if _is_uuid(p.participant_id):
            key = p.participant_id.lower()
            if key in seen:
                e.add(f"{at}.participant_id", "duplicate participant_id", "duplicate")
            seen.add(key)
        e.int_range(f"{at}.participant_index", p.participant_index, 0, None, required=False)
        e.int_range(f"{at}.total_time_ms", p.total_time_ms, MIN_TIME_MS, MAX_TIME_MS, required=True)
        if p.group_id is not None:
            e.uuid(f"{at}.group_id", p.group_id)
            # Members of one group share a bank, so they must agree on its size.
            if cmd.sync_mode == SyncMode.PER_GROUP and _is_int(p.total_time_ms):
                first = group_bank.setdefault(p.group_id, p.total_time_ms)
                if first != p.total_time_ms:
                    e.add(f"{at}.total_time_ms",
                          f"members of group {p.group_id} must have the same total_time_ms "
                          f"({first})", "group_mismatch")


def _metadata(e: _Errors, metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        e.add("metadata", "must be an object", "dict_type")
        return
    try:
        # measured as stored: UTF-8, not the \uXXXX-escaped form (an emoji is 4 bytes, not 12)
        size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
        msgpack.packb(metadata, use_bin_type=True)  # must survive the checkpoint codec
    except (TypeError, ValueError, OverflowError):
        e.add("metadata", "must be plain JSON", "value_error")
        return
    if size > MAX_METADATA_BYTES:
        e.add("metadata", f"must be at most {MAX_METADATA_BYTES} bytes", "too_big")
