"""Hypothesis strategies for the property tests: random sessions, commands and time gaps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from kairos import (
    Cancel,
    Complete,
    Create,
    ParticipantSpec,
    Pause,
    Resume,
    Start,
    Switch,
    Tick,
)

from .helpers import SID, G, P

MODES = ["per_participant", "per_group", "per_cycle", "global", "count_up"]
UNKNOWN = "00000000-0000-0000-0000-000000000000"


@dataclass
class Scenario:
    create: Create
    steps: list[tuple[int, Any]]  # (gap before the command in ms, command)
    actor_ticks: bool  # tick at every deadline before each command, as a live actor does


@st.composite
def creates(draw: st.DrawFn) -> Create:
    mode = draw(st.sampled_from(MODES))
    n = draw(st.integers(1, 5))
    bank = st.integers(1000, 20_000)
    if mode == "per_group":
        groups = draw(st.lists(st.sampled_from([G[0], G[1], G[2], None]), min_size=n, max_size=n))
        group_bank = {g: draw(bank) for g in G[:3]}
        specs = tuple(ParticipantSpec(P[i], group_bank[g] if g else draw(bank), group_id=g)
                      for i, g in enumerate(groups))
    else:
        specs = tuple(ParticipantSpec(P[i], draw(bank)) for i in range(n))
    policies = [None, "end_session", "skip_participant"]
    if mode == "per_cycle":
        policies.append("auto_advance")
    return Create(
        session_id=SID,
        sync_mode=mode,
        participants=specs,
        owner="o",
        total_time_ms=draw(st.integers(1000, 40_000)) if mode == "global" else None,
        time_per_cycle_ms=draw(st.integers(1000, 8000)) if mode == "per_cycle" else None,
        increment_ms=draw(st.sampled_from([0, 0, 500, 3000])),
        max_time_ms=draw(st.none() | st.integers(1000, 40_000)),
        expiry_policy=draw(st.sampled_from(policies)),
        time_warning_ms=draw(st.none() | st.integers(0, 8000)),
    )


def commands(n: int) -> st.SearchStrategy[Any]:
    ids = st.sampled_from([None, None, None, "k1", "k2", "k3"])
    who = st.sampled_from([None, None, *P[:n], UNKNOWN])
    return st.one_of(
        st.builds(Switch, next_participant_id=who, expected_active_participant_id=who,
                  command_id=ids),
        st.builds(Switch, command_id=ids),
        st.just(Tick()),
        st.builds(Start, command_id=ids),
        st.builds(Pause, command_id=ids),
        st.builds(Resume, command_id=ids),
        st.builds(Complete, command_id=ids) | st.builds(Cancel, command_id=ids),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    create = draw(creates())
    n = len(create.participants)
    gap = st.sampled_from([0, 1, 999, 1000]) | st.integers(0, 12_000)
    steps = draw(st.lists(st.tuples(gap, commands(n)), min_size=1, max_size=18))
    # Most runs start right away, so the interesting part is not spent on refused commands.
    if draw(st.booleans()):
        steps.insert(0, (0, Start()))
    return Scenario(create, steps, draw(st.booleans()))
