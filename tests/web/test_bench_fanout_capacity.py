"""`python -m bench fanout` and `capacity` at tiny sizes: the tools run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.servers import REPO

pytestmark = pytest.mark.slow


def test_bench_fanout_delivers_every_version_to_every_socket(redis_url: str, database_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "fanout", "--sockets", "30", "--sessions", "2", "--clients", "2",
         "--switches", "4", "--redis-url", redis_url, "--database-url", database_url, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )
    (result,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["connected"] == 30 and result["connect_failed"] == 0
    assert result["switches"] == 4 and result["missed"] == 0 and result["wait_timeouts"] == 0
    assert result["p50_ms"] > 0 and sum(result["split"]) >= 30


def test_bench_capacity_times_every_expiry(redis_url: str, database_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "capacity", "--sessions", "50", "--expiring", "5", "--sample", "5",
         "--load-rps", "20", "--redis-url", redis_url, "--database-url", database_url, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )
    (result,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sessions"] == 50 and result["quiet_expired"] == result["load_expired"] == 5
    assert result["rss_after_mb"] > 0 and result["load_rps"] > 0
