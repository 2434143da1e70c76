"""A lone audit consumer in its own process (killed with SIGKILL by the failure tests).

usage: python audit_consumer_proc.py REDIS_URL KEY_PREFIX DATABASE_URL CONSUMER_NAME
"""

from __future__ import annotations

import sys

import anyio
import redis.asyncio as aioredis

from actors.outbox.audit import AuditServices


async def main(redis_url: str, key_prefix: str, database_url: str, consumer: str) -> None:
    client = aioredis.from_url(redis_url)
    async with AuditServices(client, key_prefix=key_prefix, database_url=database_url,
                             consumer=consumer, batch_size=100):
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
