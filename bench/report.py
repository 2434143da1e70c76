"""What a bench run measured, and how it is shown: progress on stderr while it runs, a table on
stdout at the end, a JSON document (`--json`) and percentile curves (`--plot`).

Every latency names the baseline it is compared with (measured in the same run through the same
client, e.g. GET /health) and is printed as a ratio to it: absolute times on a shared machine are
noise, ratios much less so.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import Summary, percentile_curve

SCHEMA = "kairos-bench/1"


class BenchError(Exception):
    """A failure worth one line to the user (bad target, refused request, missing extra)."""


@dataclass
class Latency:
    """Samples of one latency with its unit and the name of its baseline latency."""

    label: str
    samples: list[float]
    unit: str = "ms"
    baseline: str | None = None

    @property
    def summary(self) -> Summary:
        return Summary.of(self.samples)


@dataclass
class Value:
    """One scalar result (a rate, a CPU cost, a count), optionally compared with a baseline value."""

    label: str
    value: float
    unit: str
    baseline: str | None = None


@dataclass
class Report:
    """The results of one subcommand run, in the order they were measured."""

    command: str
    parameters: dict[str, Any]
    quiet: bool = False
    latencies: dict[str, Latency] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    servers: dict[str, str | None] = field(default_factory=dict)  # URL -> what it says it is
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0

    # -- while running ---------------------------------------------------------------------
    def step(self, message: str) -> None:
        """A progress line on stderr (silent with --quiet)."""
        if not self.quiet:
            print(f"[{self.command} {time.monotonic() - self.started:6.1f}s] {message}",
                  file=sys.stderr, flush=True)

    # -- results ---------------------------------------------------------------------------
    def latency(self, name: str, samples: Sequence[float], label: str, *,
                baseline: str | None = None, unit: str = "ms") -> None:
        """Record a latency (`baseline` names another latency of this report)."""
        self.latencies[name] = Latency(label, list(samples), unit, baseline)

    def value(self, name: str, value: float, unit: str, label: str, *,
              baseline: str | None = None) -> None:
        """Record a scalar result (`baseline` names another value of this report)."""
        self.values[name] = Value(label, value, unit, baseline)

    def add_server(self, url: str) -> None:
        """Remember a server measured in this run, and what it says it is (while it is up)."""
        self.servers[url] = server_implementation(url)

    def note(self, text: str) -> None:
        """A line printed under the table (and kept in the JSON)."""
        self.notes.append(text)

    def per_master(self, name: str, what: str, rates: dict[int, float], base: str) -> None:
        """Throughput on each Redis size (masters -> rate/s), in all and per master, as ratios to
        size `base`; then the load average the ratios were measured under."""
        for n, rate in rates.items():
            self.value(f"{n}m_{name}", rate, "/s", f"{what} on {n} master(s)", baseline=f"{base}_{name}")
            self.value(f"{n}m_{name}_per_master", rate / n, "/s", f"{what} per master, {n} master(s)",
                       baseline=f"{base}_{name}_per_master")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        self.note(f"ratios are to {base}; load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} cores")

    def latency_ratio(self, name: str, key: str = "p50") -> float | None:
        """`key` of latency `name` divided by the same percentile of its baseline."""
        lat = self.latencies[name]
        base = self.latencies.get(lat.baseline or "")
        if base is None:
            return None
        a, b = getattr(lat.summary, key), getattr(base.summary, key)
        return a / b if b and not math.isnan(a) and not math.isnan(b) else None

    def value_ratio(self, name: str) -> float | None:
        """Value `name` divided by its baseline value."""
        v = self.values[name]
        base = self.values.get(v.baseline or "")
        return v.value / base.value if base is not None and base.value else None

    # -- output ----------------------------------------------------------------------------
    def table(self) -> str:
        """Plain-text table of every latency (percentiles, baseline, ratios) and value."""
        out = [f"== {self.command}" + (f"  ERROR: {self.error}" if self.error else "")]
        if self.latencies:
            out.append(f"  {'latency':<44} {'unit':<4} {'n':>6} {'p50':>9} {'p90':>9} {'p99':>9} "
                       f"{'p99.9':>9} {'max':>9}  {'baseline':<16} {'x p50':>6} {'x p99':>6}")
            for name, lat in self.latencies.items():
                s = lat.summary
                r50, r99 = self.latency_ratio(name), self.latency_ratio(name, "p99")
                cells = " ".join(f"{v:>9.3f}" for v in (s.p50, s.p90, s.p99, s.p99_9, s.max))
                out.append(f"  {lat.label:<44} {lat.unit:<4} {s.count:>6} {cells}  "
                           f"{lat.baseline or '-':<16} {_ratio(r50)} {_ratio(r99)}")
        if self.values:
            out.append(f"  {'value':<44} {'unit':<4} {'':>16}  {'baseline':<16} {'ratio':>6}")
            for name, v in self.values.items():
                out.append(f"  {v.label:<44} {v.unit:<4} {v.value:>16.3f}  {v.baseline or '-':<16} "
                           f"{_ratio(self.value_ratio(name))}")
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def as_json(self) -> dict[str, Any]:
        """This run's part of the JSON document (parameters, latencies, values, notes)."""
        lats = {}
        for name, lat in self.latencies.items():
            lats[name] = {"label": lat.label, "unit": lat.unit, **lat.summary.as_dict(),
                          "baseline": lat.baseline, "ratio_p50": self.latency_ratio(name),
                          "ratio_p99": self.latency_ratio(name, "p99")}
        vals = {name: {"label": v.label, "value": v.value, "unit": v.unit, "baseline": v.baseline,
                       "ratio": self.value_ratio(name)} for name, v in self.values.items()}
        return _finite({"parameters": self.parameters, "elapsed_s": round(self.elapsed_s, 3),
                        "error": self.error, "latencies": lats, "values": vals, "notes": self.notes})


def _ratio(r: float | None) -> str:
    return f"{r:>6.2f}" if r is not None else f"{'-':>6}"


def _finite(obj: Any) -> Any:
    """NaN/inf become null: the JSON must parse everywhere."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def document(command: str, parameters: dict[str, Any], reports: list[Report],
             started_at: datetime, elapsed_s: float) -> dict[str, Any]:
    """The `--json` document: schema, command, machine, parameters and one entry per run."""
    redis_url = next((r.redis_url for r in reports if r.redis_url), None)
    database_url = next((r.database_url for r in reports if r.database_url), None)
    servers = {u: v for r in reports for u, v in r.servers.items()}
    return {"schema": SCHEMA, "command": command, "started_at": started_at.isoformat(),
            "elapsed_s": round(elapsed_s, 3),
            "machine": machine(redis_url, database_url, servers),
            "parameters": _finite(parameters),
            "runs": {r.command: r.as_json() for r in reports}}


def now_utc() -> datetime:
    """The wall clock, for the document's `started_at`."""
    return datetime.now(UTC)


def machine(redis_url: str | None, database_url: str | None,
            servers: dict[str, str | None]) -> dict[str, Any]:
    """Cores, Python, and the versions of Kairos, Redis and PostgreSQL (null where unknown)."""
    try:
        harness = importlib.metadata.version("kairos")
    except importlib.metadata.PackageNotFoundError:
        harness = None
    return {"cores": os.cpu_count(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "platform": platform.platform(),
            "kairos": harness, "servers": servers,
            "redis": _redis_version(redis_url), "postgresql": _postgres_version(database_url)}


def server_implementation(url: str) -> str | None:
    """What a server says it is (`implementation`, else `server_version`, of GET /v1/time)."""
    import httpx

    try:
        body = httpx.get(f"{url}/v1/time", timeout=2).json()
        return body.get("implementation") or body.get("server_version")
    except Exception:  # a server without /v1/time is still comparable
        return None


def _redis_version(url: str | None) -> str | None:
    if not url:
        return None
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()
    except Exception:  # unreachable: the version is simply unknown
        return None


def _postgres_version(url: str | None) -> str | None:
    if not url:
        return None

    async def ask() -> str:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=5)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    try:
        return asyncio.run(ask())
    except Exception:  # unreachable: the version is simply unknown
        return None


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write the document (pretty, UTF-8)."""
    Path(path).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def require_matplotlib() -> None:
    """Fail early (before a long run) when --plot is asked for without matplotlib installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise BenchError("--plot needs matplotlib: pip install 'kairos[plot]'") from e


def plot(path: str, reports: list[Report], title: str) -> None:
    """Latency percentile curves (HDR style: x = percentile, stretched towards the tail), one
    panel per run, or per metric where a run measured several targets (`A.switch`, `B.switch`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Latency]] = {}
    for r in reports:
        for name, lat in r.latencies.items():
            metric = name.split(".", 1)[1] if "." in name else ""
            panels.setdefault(f"{r.command}: {metric}" if metric else r.command, []).append(lat)
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(12, 3.2 * max(1, len(panels))), squeeze=False)
    ticks = [0.5, 0.9, 0.99, 0.999, 0.9999]
    for ax, (name, lats) in zip(axes[:, 0], panels.items(), strict=False):
        for lat in lats:
            qs, vs = percentile_curve(lat.samples)
            ax.plot([1 / (1 - q) for q in qs], vs, label=f"{lat.label} ({lat.unit})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1 / (1 - q) for q in ticks], [f"{q * 100:g}%" for q in ticks])
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)
