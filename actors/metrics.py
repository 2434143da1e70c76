"""Prometheus metrics of the runtime (default registry: `/metrics` of the web edge shows them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LEASES_CLAIMED = Counter(
    "kairos_leases_claimed_total", "Session leases claimed by this instance",
    ["reason"],  # new | released (passivated/deleted before) | takeover (owner died) | handoff | self
)
DEADLINE_LATENESS = Histogram(
    "kairos_deadline_lateness_seconds", "How late a deadline (expiry, time-out, warning) was applied",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DEADLINE_MISSED_WHILE_STOPPED = Histogram(
    "kairos_deadline_missed_while_stopped_seconds",
    "How far past its deadline a session was when claimed after a clean stop had released it "
    "(downtime with no instance running, not lateness of a live owner)",
    buckets=(0.1, 1, 5, 15, 60, 300, 1800, 3600, 21600, 86400),
)
COMMANDS_RETRIED = Counter(
    "kairos_commands_retried_total", "Routing retries of a command", ["why"],  # moved | owner_gone
)
LIVENESS_LOST = Counter("kairos_liveness_lost_total", "Times this process lost its incarnation")
DRAIN_SECONDS = Histogram(
    "kairos_drain_seconds", "Time to hand off every lease on drain", buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
WRITES_REPEATED = Counter(
    "kairos_writes_repeated_total", "Fenced writes sent again after a lost reply and found already written",
)
CLOCK_OFFSET = Gauge(
    "kairos_clock_offset_seconds", "Redis TIME minus this instance's clock (the correction applied)",
)
CLOCK_ERROR = Gauge(
    "kairos_clock_error_seconds", "Bound on the error of the cluster time this instance uses",
)
FANOUT_RECONNECTS = Counter(
    "kairos_fanout_reconnects_total",
    "Pub/sub reconnects of the fan-out (each re-syncs every watched session's sockets)",
)
