"""The one place a Redis client is made: a plain server, or the master named by Redis Sentinel.

    redis://host:6379/0                                  one server
    redis+sentinel://[user:password@]s1:26379,s2:26379/mymaster[/db]

With Sentinel every connection of the pool (scripts, pub/sub, BLPOP on the inbox, the outbox
consumers) asks the sentinels for the master whenever it (re)connects, and a connection still
open to a demoted master is dropped on its first READONLY answer (redis-py's
`SentinelConnectionPool`), so the whole process follows a failover by itself.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"


def sentinel_url(sentinels: list[str], master: str) -> str:
    """The `redis+sentinel://` URL for sentinel `host:port` addresses and a master name."""
    return f"{SENTINEL_SCHEME}://{','.join(sentinels)}/{master}"


def open_redis(url: str, **kwargs: Any) -> aioredis.Redis:
    """A client for `url` (see the module docstring); `kwargs` go to every master connection."""
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return aioredis.Redis.from_url(url, **kwargs)
    sentinels, master, options = parse_sentinel_url(url)
    # Sentinel queries get the same socket timeouts as the data connections (redis-py's default).
    return Sentinel(sentinels, **kwargs).master_for(master, **options)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """(sentinel addresses, master name, master connection options) of a `redis+sentinel://` URL."""
    parts = urlsplit(url)
    netloc = parts.netloc
    options: dict[str, Any] = {}
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, _, password = auth.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    sentinels = []
    for address in filter(None, netloc.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {address!r} is not host:port")
        sentinels.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"expected {SENTINEL_SCHEME}://host:port[,host:port...]/master[/db], got {url!r}")
    if len(path) == 2:
        options["db"] = int(path[1])
    return sentinels, unquote(path[0]), options
