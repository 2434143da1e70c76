"""Single writer (invariant 1) at the script level: claims, fencing, liveness, real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.keys import Keys, Scripts
from actors.router import CLAIMED, FORWARDED, MINE, NOT_ALIVE, OWNED_ELSEWHERE, UNOWNED

pytestmark = pytest.mark.anyio

TTL = 10_000
REPO = Path(__file__).resolve().parents[2]


async def joined(scripts: Scripts, n: int) -> list[str]:
    incs = [uuid.uuid4().hex for _ in range(n)]
    for inc in incs:
        assert await scripts.do_join(inc, b"{}", TTL)
    return incs


async def write(scripts: Scripts, inc: str, epoch: int, sid: str, body: bytes = b"cp") -> int:
    return await scripts.do_fenced_write(inc, epoch, sid, body, b"msg", None)


async def test_concurrent_claims_give_one_owner_per_epoch(redis: Any, key_prefix: str) -> None:
    scripts = Scripts(redis, Keys(key_prefix))
    incs = await joined(scripts, 8)
    sid = str(uuid.uuid4())
    seen: dict[int, list[str]] = {}
    for _round in range(5):
        results: list[tuple[str, list[Any]]] = []

        async def claim(inc: str, results: list[tuple[str, list[Any]]] = results) -> None:
            results.append((inc, await scripts.do_claim_or_forward(inc, sid, may_claim=True)))

        async with anyio.create_task_group() as tg:
            for inc in incs:
                tg.start_soon(claim, inc)
        winners = [(inc, int(r[1])) for inc, r in results if r[0] == CLAIMED]
        assert len(winners) == 1, results
        winner, epoch = winners[0]
        seen.setdefault(epoch, []).append(winner)
        assert all(r[0] == OWNED_ELSEWHERE for inc, r in results if inc != winner)
        # the owner dies: its liveness key goes, and it must not come back
        await scripts.do_leave(winner)
        incs.remove(winner)
        incs.append((await joined(scripts, 1))[0])
    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert all(len(owners) == 1 for owners in seen.values())


async def test_write_fenced_by_an_old_epoch_is_rejected(redis: Any, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    scripts = Scripts(redis, keys)
    a, b = await joined(scripts, 2)
    sid = str(uuid.uuid4())
    r = await scripts.do_claim_or_forward(a, sid, may_claim=True)
    assert r[0] == CLAIMED and r[3] == b"new"
    assert await write(scripts, a, 1, sid, b"v1") == 1
    assert await scripts.do_release(a, 1, sid)
    r = await scripts.do_claim_or_forward(b, sid, may_claim=True)
    assert r[0] == CLAIMED and int(r[1]) == 2 and r[2] == b"v1" and r[3] == b"released"
    assert await write(scripts, a, 1, sid, b"zombie") == 0  # a is alive but its epoch is old
    assert await write(scripts, b, 1, sid, b"zombie") == 0  # right owner, wrong epoch
    assert await redis.get(keys.checkpoint(sid)) == b"v1"
    assert await redis.xlen(keys.outbox) == 1
    assert await write(scripts, b, 2, sid, b"v2") == 1
    # b dies; a takes over; b's late write is refused for its liveness first
    await scripts.do_leave(b)
    r = await scripts.do_claim_or_forward(a, sid, may_claim=True)
    assert r[0] == CLAIMED and int(r[1]) == 3 and r[3] == b"takeover"
    assert await write(scripts, b, 2, sid, b"zombie") == -1
    assert await redis.get(keys.checkpoint(sid)) == b"v2"


async def test_dead_instance_can_neither_claim_nor_renew(redis: Any, key_prefix: str) -> None:
    scripts = Scripts(redis, Keys(key_prefix))
    (a,) = await joined(scripts, 1)
    await scripts.do_leave(a)
    assert (await scripts.do_claim_or_forward(a, str(uuid.uuid4()), may_claim=True))[0] == NOT_ALIVE
    assert not await scripts.do_renew(a, b"{}", TTL)  # never recreated
    assert await redis.exists(Keys(key_prefix).liveness(a)) == 0


async def test_claim_or_forward_routes_to_live_owner_inbox(redis: Any, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    scripts = Scripts(redis, keys)
    a, b = await joined(scripts, 2)
    sid = str(uuid.uuid4())
    assert (await scripts.do_claim_or_forward(b, sid, may_claim=False, payload=b"x"))[0] == UNOWNED
    await scripts.do_claim_or_forward(a, sid, may_claim=True)
    assert (await scripts.do_claim_or_forward(a, sid, may_claim=False))[0] == MINE
    r = await scripts.do_claim_or_forward(b, sid, may_claim=True, payload=b"cmd")
    assert r[0] == FORWARDED and r[1].decode() == a
    assert await redis.lrange(keys.inbox(a), 0, -1) == [b"cmd"]
    assert await redis.pttl(keys.inbox(a)) > 0


CLAIMER = r"""
import asyncio, json, sys, uuid
import redis.asyncio as R
from actors.keys import Keys, Scripts
async def main(url, prefix, sid, rounds):
    r = R.Redis.from_url(url)
    s = Scripts(r, Keys(prefix))
    inc = uuid.uuid4().hex
    await s.do_join(inc, b"{}", 10_000)
    await r.incr(prefix + "ready")
    while int(await r.get(prefix + "ready")) < int(sys.argv[5]):
        await asyncio.sleep(0.001)
    out = []
    for _ in range(rounds):
        res = await s.do_claim_or_forward(inc, sid, may_claim=True)
        if res[0] == 1:
            epoch = int(res[1])
            ok = await s.do_fenced_write(inc, epoch, sid, inc.encode(), b"m", None)
            out.append([epoch, ok])
            await s.do_release(inc, epoch, sid)
    print(json.dumps({"inc": inc, "claims": out}))
    await r.aclose()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def test_claims_from_separate_processes_give_one_owner_per_epoch(redis_url: str, key_prefix: str) -> None:
    sid = str(uuid.uuid4())
    n = 4
    procs = [
        subprocess.Popen([sys.executable, "-c", CLAIMER, redis_url, key_prefix, sid, "100", str(n)],
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(n)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0
            outputs.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    claims = [(c[0], c[1], o["inc"]) for o in outputs for c in o["claims"]]
    epochs = [e for e, _, _ in claims]
    assert len(epochs) == len(set(epochs))  # never two owners for one epoch
    assert sorted(epochs) == list(range(1, len(epochs) + 1))
    # between its claim and its release nobody else could claim, so every winner's write landed
    assert all(ok == 1 for _, ok, _ in claims)
    assert len({inc for _, _, inc in claims}) > 1  # really contended across processes
