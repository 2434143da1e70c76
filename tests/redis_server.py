"""The own-Redis helper lives in the package (`bench/redis_server.py`: the failover bench uses it
too); tests import it from here."""

from bench.redis_server import RedisServer

__all__ = ["RedisServer"]
