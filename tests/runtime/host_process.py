"""A host in its own process, for zombie tests: creates and starts a session, then keeps
switching it every 20 ms, printing `ack <version>` or `err <code>` per command (line-buffered).

    python tests/runtime/host_process.py REDIS_URL KEY_PREFIX SESSION_ID LEASE_TTL_MS
"""

from __future__ import annotations

import sys
import uuid

import anyio
import redis.asyncio as aioredis

from actors.host import Host
from kairos.commands import Create, ParticipantSpec, Start, Switch
from kairos.errors import KairosError


async def main(url: str, prefix: str, sid: str, ttl_ms: int) -> None:
    client = aioredis.Redis.from_url(url)
    async with Host(client, key_prefix=prefix, lease_ttl_ms=ttl_ms, switch_rate_per_s=0) as host:
        ps = tuple(ParticipantSpec(str(uuid.uuid4()), 3_600_000) for _ in range(2))
        await host.ask(sid, Create(session_id=sid, sync_mode="per_participant", participants=ps, owner="z"))
        await host.ask(sid, Start())
        print(f"ready {host.incarnation}", flush=True)
        while True:
            try:
                reply = await host.ask(sid, Switch())
                print(f"ack {reply.outcome['version']}", flush=True)
            except KairosError as e:
                print(f"err {e.code}", flush=True)
            await anyio.sleep(0.02)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
