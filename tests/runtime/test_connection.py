"""actors/connection.py: the one place a Redis client is made (so every pool follows Sentinel)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors.connection import is_cluster, open_redis, parse_cluster_url, parse_sentinel_url

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


def test_cluster_url_names_nodes_and_credentials() -> None:
    nodes, options = parse_cluster_url("redis+cluster://u:p%40ss@n1:7000,n2:7001")
    assert nodes == [("n1", 7000), ("n2", 7001)] and options == {"username": "u", "password": "p@ss"}
    assert is_cluster(open_redis("redis+cluster://n1:7000"))
    assert not is_cluster(open_redis("redis://n1:6379/0"))


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://n1", "redis+cluster://n1:7000/0"])
def test_a_bad_cluster_url_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url(url)


def test_cluster_settings_compose_the_url_and_default_to_16_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    from web.settings import load

    monkeypatch.delenv("KAIROS_REDIS_URL", raising=False)
    monkeypatch.setenv("KAIROS_REDIS_CLUSTER_NODES", "n1:7000, n2:7001")
    s = load()
    assert s.redis_url == "redis+cluster://n1:7000,n2:7001" and s.redis_cluster and s.partitions == 16
    monkeypatch.setenv("KAIROS_REDIS_PARTITIONS", "4")
    assert load().partitions == 4
    monkeypatch.setenv("KAIROS_REDIS_MIN_REPLICAS_ACK", "1")
    assert load().redis_min_replicas_ack == 1  # WAIT goes to the node each write went to
    monkeypatch.delenv("KAIROS_REDIS_CLUSTER_NODES")
    monkeypatch.delenv("KAIROS_REDIS_PARTITIONS")
    assert load().partitions == 1


def test_errors_that_mean_try_again_later() -> None:
    from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from actors.connection import unavailable

    closed = RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
    for error in (RedisConnectionError(), TryAgainError(), ClusterDownError("CLUSTERDOWN"), closed):
        assert unavailable(error), error
    for error in (RuntimeError("a bug"), ResponseError("WRONGTYPE"), ValueError()):
        assert not unavailable(error), error


@pytest.mark.anyio
async def test_a_connection_torn_down_under_a_command_counts_as_lost_not_as_a_bug() -> None:
    """A cluster failover: redis-py drops a connection another task is about to write on, whose
    write then fails with an AttributeError (an outbox reader died of it, and with it every
    background task of the instance); the same error from our own code stays a bug."""
    from redis.asyncio.connection import Connection

    from actors.connection import redis_failed, unavailable

    dropped = Connection(host="127.0.0.1", port=1)  # never connected: its writer is None
    with pytest.raises(AttributeError) as caught:
        await dropped._send_packed_command([b"PING\r\n"])
    assert unavailable(caught.value) and redis_failed(caught.value)
    try:
        None.writelines  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as ours:
        assert not unavailable(ours) and not redis_failed(ours)
