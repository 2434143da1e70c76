"""Percentile summaries of latency samples (the HDR set: p50/p90/p99/p99.9/max and count).

Runs are bounded (thousands to a few hundred thousand samples), so the summary is computed
exactly from the sorted samples rather than from a bucketed histogram.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: The percentiles every summary reports, as (JSON key, quantile).
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99),
                                              ("p99_9", 0.999))


def quantile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile of already sorted samples (the value at or above q·n)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Summary:
    """Count and percentile set of one latency, in the samples' unit."""

    count: int
    p50: float
    p90: float
    p99: float
    p99_9: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        """Summarise `samples` (any order); an empty list gives NaNs and count 0."""
        s = sorted(samples)
        mean = math.fsum(s) / len(s) if s else math.nan
        return cls(len(s), *(quantile(s, q) for _, q in PERCENTILES), s[-1] if s else math.nan, mean)

    def as_dict(self) -> dict[str, float]:
        """JSON-ready fields (count, p50, p90, p99, p99_9, max, mean)."""
        return asdict(self)


def percentile_curve(samples: Sequence[float], points: int = 200) -> tuple[list[float], list[float]]:
    """(quantiles, values) for an HDR percentile plot: dense towards the tail (1 - q halves)."""
    s = sorted(samples)
    if not s:
        return [], []
    tail = max(1.0, math.log2(len(s)))  # no point resolving past one sample
    qs = [1 - 2 ** (-tail * i / points) for i in range(points + 1)]
    return qs, [quantile(s, q) for q in qs]
