"""The one place a Redis client is made: a plain server, the master named by Redis Sentinel, or a
Redis Cluster.

    redis://host:6379/0                                  one server
    redis+sentinel://[user:password@]s1:26379,s2:26379/mymaster[/db]
    redis+cluster://[user:password@]n1:7000,n2:7001,...  a Redis Cluster (any of its nodes)

With Sentinel every connection of the pool (scripts, pub/sub, BLPOP on the inbox, the outbox
consumers) asks the sentinels for the master whenever it (re)connects, and a connection still
open to a demoted master is dropped on its first READONLY answer (redis-py's
`SentinelConnectionPool`), so the whole process follows a failover by itself.

With a cluster, keyed commands and scripts go through redis-py's `RedisCluster` (slot map,
MOVED/ASK/TRYAGAIN); pub/sub goes through `pubsub_client`: one plain connection to any node (a
classic PUBLISH reaches the subscribers of every node), moving to the next node when its node
is gone.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, ConnectionPool
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    RedisClusterException,
    RedisError,
    TimeoutError,
    TryAgainError,
)

# Redis errors after which trying again later is right (the router retries to its deadline, a
# read answers 503): a lost connection or a timeout, and on a cluster a slot whose keys are being
# migrated (TRYAGAIN: nothing ran), a slot without a master during a node failover
# (CLUSTERDOWN, or redis-py finding no node for it while it reloads the slot map), and MOVED/ASK
# still coming after redis-py's own redirections.
UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError, TimeoutError, TryAgainError, ClusterDownError, RedisClusterException, AskError)



_REDIS_PACKAGE = os.path.dirname(redis.__file__) + os.sep


def connection_lost(error: BaseException) -> bool:
    """Whether `error` is redis-py's for a connection torn down under a command in flight, which
    it raises as a RuntimeError or an AttributeError/TypeError instead of a ConnectionError."""
    # On a cluster failover redis-py drops connections other tasks are using: "handler is closed",
    # "'NoneType' object has no attribute 'writelines'" (an outbox reader died of it, and the
    # instance's background tasks with it); also redis-py issue 4287 (a peer-reset connection).
    if isinstance(error, RuntimeError) and "is closed" in str(error):
        return True
    if not isinstance(error, (AttributeError, TypeError)) or "NoneType" not in str(error):
        return False
    tb = error.__traceback__  # raised inside redis-py, not a bug of ours in a callback
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(_REDIS_PACKAGE):
        tb = tb.tb_next
    return tb is not None


def unavailable(error: BaseException) -> bool:
    """Whether `error` means Redis could not run the command now (`UNAVAILABLE`, or a connection
    lost under it)."""
    return isinstance(error, UNAVAILABLE) or connection_lost(error)


def redis_failed(error: BaseException) -> bool:
    """Whether `error` came from Redis or the connection to it (any RedisError, a socket error,
    a connection lost under the command): what background readers log and retry, never die of."""
    return isinstance(error, (RedisError, OSError)) or connection_lost(error)


SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"


def sentinel_url(sentinels: list[str], master: str) -> str:
    """The `redis+sentinel://` URL for sentinel `host:port` addresses and a master name."""
    return f"{SENTINEL_SCHEME}://{','.join(sentinels)}/{master}"


def cluster_url(nodes: list[str]) -> str:
    """The `redis+cluster://` URL for cluster node `host:port` addresses."""
    return f"{CLUSTER_SCHEME}://{','.join(nodes)}"


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(CLUSTER_SCHEME + "://")


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (scripts then keep to one slot each)."""
    return isinstance(client, RedisCluster)


def connection_kwargs(client: Any) -> dict[str, Any]:
    """The options `client` makes its connections with (a cluster client keeps them itself)."""
    if is_cluster(client):
        return dict(client.connection_kwargs)
    return dict(client.connection_pool.connection_kwargs) | {
        "max_connections": getattr(client.connection_pool, "max_connections", 100)}


def open_redis(url: str, **kwargs: Any) -> Any:
    """A client for `url` (see the module docstring); `kwargs` go to every data connection."""
    if is_cluster_url(url):
        nodes, options = parse_cluster_url(url)
        # reinitialize_steps=0: a MOVED (a resharded slot) only updates that slot; by default every
        # fifth one closes every connection, under the commands other tasks have in flight
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], reinitialize_steps=0,
                            **{**options, **kwargs})
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return aioredis.Redis.from_url(url, **kwargs)
    sentinels, master, options = parse_sentinel_url(url)
    # Sentinel queries get the same socket timeouts as the data connections (redis-py's default).
    return Sentinel(sentinels, **kwargs).master_for(master, **options)


class AnyNodeConnection(Connection):
    """A connection to the first of `nodes` that answers, trying the next ones in turn (each
    reconnect starts from the node that worked last): for pub/sub on a cluster."""

    def __init__(self, *, nodes: list[tuple[str, int]], **kwargs: Any) -> None:
        self.nodes = list(nodes)
        host, port = self.nodes[0]
        super().__init__(host=host, port=port, **kwargs)

    async def _connect(self) -> None:
        error: BaseException | None = None
        for _ in range(len(self.nodes)):
            try:
                await super()._connect()
                return
            except (OSError, TimeoutError) as e:  # this node is gone: the next one
                error = e
                self.nodes.append(self.nodes.pop(0))
                self.host, self.port = self.nodes[0]
        assert error is not None
        raise error


def open_pubsub(url: str, **kwargs: Any) -> aioredis.Redis:
    """A plain client for pub/sub only: `open_redis(url)`, or for a cluster one connection to any
    of its nodes (see `pubsub_client`)."""
    if not is_cluster_url(url):
        return open_redis(url, **kwargs)
    nodes, options = parse_cluster_url(url)
    return aioredis.Redis(connection_pool=ConnectionPool(
        connection_class=AnyNodeConnection, nodes=nodes, **{**options, **kwargs}))


def pubsub_client(client: Any, **kwargs: Any) -> aioredis.Redis:
    """A plain client for pub/sub next to `client`: the same client for one server or Sentinel;
    for a cluster, one connection to any node (classic PUBLISH is cluster-wide)."""
    if not is_cluster(client):
        return client
    nodes = [(n.host, int(n.port)) for n in client.get_nodes()] or [
        (n.host, int(n.port)) for n in client.nodes_manager.startup_nodes.values()]
    options = {k: v for k, v in client.connection_kwargs.items()
               if k in ("username", "password", "socket_timeout", "socket_connect_timeout", "client_name")}
    pool = ConnectionPool(connection_class=AnyNodeConnection, nodes=nodes, **{**options, **kwargs})
    return aioredis.Redis(connection_pool=pool)


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(node addresses, connection options) of a `redis+cluster://` URL."""
    parts = urlsplit(url)
    netloc, options = _credentials(parts.netloc)
    nodes = _addresses(netloc, "cluster node")
    if not nodes or parts.path.strip("/"):
        raise ValueError(f"expected {CLUSTER_SCHEME}://host:port[,host:port...], got {url!r}")
    return nodes, options


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """(sentinel addresses, master name, master connection options) of a `redis+sentinel://` URL."""
    parts = urlsplit(url)
    netloc, options = _credentials(parts.netloc)
    sentinels = _addresses(netloc, "sentinel")
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"expected {SENTINEL_SCHEME}://host:port[,host:port...]/master[/db], got {url!r}")
    if len(path) == 2:
        options["db"] = int(path[1])
    return sentinels, unquote(path[0]), options


def _credentials(netloc: str) -> tuple[str, dict[str, Any]]:
    options: dict[str, Any] = {}
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, _, password = auth.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    return netloc, options


def _addresses(netloc: str, what: str) -> list[tuple[str, int]]:
    out = []
    for address in filter(None, netloc.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{what} address {address!r} is not host:port")
        out.append((host, int(port)))
    return out
