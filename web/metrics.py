"""Prometheus metrics of the web edge (docs/production.md), served at `/metrics`.

Runtime metrics (leases claimed, deadline lateness, audit lag, push results) are registered by
`actors/` in the same default registry, so `/metrics` shows them all.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

COMMAND_SECONDS = Histogram(
    "kairos_command_seconds", "Command latency (REST and WebSocket) by command and path",
    ["command", "path"],
    buckets=_BUCKETS,
)
HTTP_REQUESTS = Counter("kairos_http_requests_total", "HTTP requests", ["method", "route", "status"])
WS_CONNECTIONS = Gauge("kairos_ws_connections", "Open WebSocket connections")
WS_MESSAGES = Counter("kairos_ws_messages_total", "WebSocket messages", ["direction", "type"])
WS_DROPPED = Counter("kairos_ws_dropped_total", "Sockets dropped because their send queue overflowed")
ACTORS_ACTIVE = Gauge("kairos_actors_active", "Session actors live on this instance")
WS_FANOUT_SECONDS = Histogram(
    "kairos_ws_fanout_seconds",
    "One update written to every local socket of its session (one pass; the last socket's wait)",
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)


LOOP_LAG = Histogram(
    "kairos_event_loop_lag_seconds",
    "How late the event loop woke a 100 ms timer: the wait any timer, expiry or reply sees",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


async def watch_loop_lag(period_s: float = 0.1) -> None:
    """Sleep `period_s` over and over and record how late each wake-up was (runs forever)."""
    while True:
        t0 = time.perf_counter()
        await anyio.sleep(period_s)
        LOOP_LAG.observe(max(0.0, time.perf_counter() - t0 - period_s))


GC_PAUSE = Histogram(
    "kairos_gc_pause_seconds", "Cyclic garbage collector pauses by generation (the loop stands still meanwhile)",
    ["generation"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


def watch_gc() -> None:
    """Time every collection of the cyclic GC into `kairos_gc_pause_seconds` (once per process)."""
    if any(getattr(cb, "__name__", "") == "_gc_timer" for cb in gc.callbacks):
        return
    generations = [GC_PAUSE.labels(str(g)) for g in range(3)]  # bound once: ~1 us per collection
    started = [0.0]

    def _gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            generations[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(_gc_timer)


def observe_command(host: Any, session_id: str, command: str, seconds: float, reply: Any = None) -> None:
    """Record a command's latency, labelled `forwarded` when another instance's actor answered it
    and `local` when this instance's did (already live, or activated by this command — also when
    the command ended it, e.g. a delete). Without a reply (it failed): `local` if the actor is here."""
    if reply is not None:
        path = "forwarded" if reply.forwarded else "local"
    else:
        path = "local" if host.local_actor(session_id) is not None else "forwarded"
    COMMAND_SECONDS.labels(command, path).observe(seconds)


def track_actors(count: Callable[[], int]) -> None:
    """Report the host's live actor count at scrape time."""
    ACTORS_ACTIVE.set_function(count)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
