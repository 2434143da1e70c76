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


def run(state: Any, *steps: tuple[int, Any]) -> Any:
    """Apply (now_ms, command) steps in order and return the final Result."""
    from kairos import apply

    result = None
    for now, cmd in steps:
        result = apply(state, cmd, now)
        state = result.state
    return result


def session_in(status: str, mode: str = "per_participant", **kw: Any) -> Any:
    """A session brought to `status` by real commands at T0..T0+2000."""
    from kairos import Cancel, Complete, Pause, Start, Tick, apply

    s = apply(None, make_create(mode, **kw), T0).state
    if status == "pending":
        return s
    s = apply(s, Start(), T0 + 1000).state
    if status == "running":
        return s
    if status == "paused":
        return apply(s, Pause(), T0 + 2000).state
    if status == "completed":
        return apply(s, Complete(), T0 + 2000).state
    if status == "cancelled":
        return apply(s, Cancel(), T0 + 2000).state
    assert status == "expired"
    deadline = T0 + 1000 + s.participants[0].total_time_ms
    return apply(s, Tick(), deadline).state
