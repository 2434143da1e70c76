"""actors/connection.py: the one place a Redis client is made (so every pool follows Sentinel)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors.connection import open_redis, parse_sentinel_url

REPO = Path(__file__).resolve().parents[2]


def test_sentinel_url_names_sentinels_master_credentials_and_db() -> None:
    sentinels, master, options = parse_sentinel_url("redis+sentinel://u:p%40ss@s1:26379,s2:26380/kairos/3")
    assert sentinels == [("s1", 26379), ("s2", 26380)] and master == "kairos"
    assert options == {"username": "u", "password": "p@ss", "db": 3}
    pool = open_redis("redis+sentinel://s1:26379/kairos").connection_pool
    assert type(pool).__name__ == "SentinelConnectionPool" and pool.service_name == "kairos"


@pytest.mark.parametrize("url", ["redis+sentinel://s1:26379", "redis+sentinel:///kairos",
                                 "redis+sentinel://s1/kairos", "redis+sentinel://s1:26379/kairos/x"])
def test_a_bad_sentinel_url_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_sentinel_url(url)


def test_no_other_module_makes_its_own_redis_client() -> None:
    # A client made elsewhere (from_url) would not follow a Sentinel failover.
    offenders = [f"{p.relative_to(REPO)}:{n}" for d in ("actors", "web") for p in (REPO / d).rglob("*.py")
                 if p.name != "connection.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bfrom_url\(", line)]
    assert offenders == []
