"""Checkpoint codec CPU time: encode and decode of a 2- and a 1000-participant session.

The sessions are mid-game (running, switched, idempotency window full). Baseline: the stdlib
JSON round trip (dumps + loads) of the same session's wire form, measured in turn with them.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.report import BenchError, Report
from kairos import Create, ParticipantSpec, Start, Switch, apply, decode, encode
from kairos.rules import IDEMPOTENCY_WINDOW
from kairos.session import Session
from kairos.wire import session_json

QUICK: dict[str, Any] = {"rounds": 300}

T0 = 1_795_899_845_123


def _session(n: int) -> Session:
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(n)]
    create = Create(session_id="6f1c2b7e-3a41-4c52-9d0e-1b2c3d4e5f60", sync_mode="per_participant",
                    participants=tuple(ParticipantSpec(pid, 300_000) for pid in ids), owner="bench",
                    increment_ms=2000, time_warning_ms=10_000, metadata={"table": 7})
    s = apply(None, create, T0).state
    s = apply(s, Start(), T0 + 1000).state
    now = T0 + 1000
    for k in range(IDEMPOTENCY_WINDOW):
        now += 700
        s = apply(s, Switch(command_id=f"cmd-{k:04d}"), now).state
    return s


def _measure(state: Session, rounds: int) -> dict[str, list[float]]:
    """Per round: encode, decode, both, and the baseline (stdlib JSON of the session's wire form,
    dumps + loads) — microseconds."""
    out: dict[str, list[float]] = {"encode": [], "decode": [], "both": [], "json": []}
    wire_form = session_json(state, T0 + 60_000)
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        blob = encode(state)
        t1 = clock()
        decode(blob)
        t2 = clock()
        json.loads(json.dumps(wire_form))
        t3 = clock()
        out["encode"].append((t1 - t0) / 1000)
        out["decode"].append((t2 - t1) / 1000)
        out["both"].append((t2 - t0) / 1000)
        out["json"].append((t3 - t2) / 1000)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench codec`."""
    p.add_argument("--rounds", type=int, default=2000,
                   help="rounds for 2 participants (1000 participants: a tenth, at least 50)")


def run(args: argparse.Namespace, report: Report) -> None:
    """Encode/decode latencies (µs) for 2 and 1000 participants, next to the JSON baseline."""
    if args.rounds < 1:
        raise BenchError("--rounds must be positive")
    for n in (2, 1000):
        state = _session(n)
        rounds = args.rounds if n < 100 else max(50, args.rounds // 10)
        report.step(f"{n} participants: {rounds} rounds")
        _measure(state, min(rounds, 50))  # warm-up
        m = _measure(state, rounds)
        report.latency(f"json_{n}", m["json"], f"{n} participants: stdlib JSON (baseline)", unit="us")
        for k in ("encode", "decode", "both"):
            report.latency(f"{k}_{n}", m[k], f"{n} participants: {k}", unit="us", baseline=f"json_{n}")
        report.value(f"bytes_{n}", len(encode(state)), "B", f"{n} participants: checkpoint size")
