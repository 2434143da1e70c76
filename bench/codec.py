"""Checkpoint codec timing: encode+decode of a 2-participant and a 1000-participant session.

`python -m bench codec [--rounds N]` prints p50/p99 microseconds per encode, decode and both,
and the encoded size. The sessions are mid-game (running, switched, idempotency window full).
"""

from __future__ import annotations

import argparse
import statistics
import time

from kairos import Create, ParticipantSpec, Start, Switch, apply, decode, encode
from kairos.rules import IDEMPOTENCY_WINDOW
from kairos.session import Session

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


def _p(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1] if len(samples) > 1 else samples[0]


def _measure(state: Session, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"encode": [], "decode": [], "both": []}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        blob = encode(state)
        t1 = clock()
        decode(blob)
        t2 = clock()
        out["encode"].append((t1 - t0) / 1000)
        out["decode"].append((t2 - t1) / 1000)
        out["both"].append((t2 - t0) / 1000)
    return out


def main(argv: list[str]) -> None:
    """Print encode/decode p50 and p99 (µs) for 2 and 1000 participants."""
    ap = argparse.ArgumentParser(prog="python -m bench codec")
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args(argv)
    for n in (2, 1000):
        state = _session(n)
        rounds = args.rounds if n < 100 else max(50, args.rounds // 10)
        _measure(state, min(rounds, 50))  # warm-up
        m = _measure(state, rounds)
        size = len(encode(state))
        cells = "  ".join(f"{k} p50 {_p(v, 50):8.1f} µs p99 {_p(v, 99):8.1f} µs"
                          for k, v in m.items())
        print(f"participants={n:<5} bytes={size:<7} rounds={rounds:<5} {cells}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    main(sys.argv[1:])
