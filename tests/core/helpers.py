"""Helpers for the core tests: ids, a Create builder, and an `act` that applies a command chain."""

from __future__ import annotations

from typing import Any

from kairos.commands import Create, ParticipantSpec

SID = "6f1c2b7e-3a41-4c52-9d0e-1b2c3d4e5f60"
P = [f"223e4567-e89b-12d3-a456-4266141740{n:02d}" for n in range(1, 40)]
G = [f"aaaaaaaa-0000-4000-8000-0000000000{n:02d}" for n in range(1, 10)]
T0 = 1_795_899_845_123


def make_create(mode: str = "per_participant", n: int = 2, bank: int = 300_000,
                **kw: Any) -> Create:
    """A valid Create for `n` participants with equal banks; keyword args override fields."""
    groups = kw.pop("groups", None)
    participants = tuple(
        ParticipantSpec(P[i], bank, group_id=None if groups is None else groups[i])
        for i in range(n)
    )
    base: dict[str, Any] = {"session_id": SID, "sync_mode": mode, "participants": participants,
                            "owner": "host-1"}
    if mode == "global":
        base["total_time_ms"] = 60_000
    if mode == "per_cycle":
        base["time_per_cycle_ms"] = 10_000
    base.update(kw)
    return Create(**base)
