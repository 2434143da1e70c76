"""Zombie safety: a host frozen (SIGSTOP) past its liveness TTL, then resumed, writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors.keys import Keys
from kairos.commands import Switch
from tests.runtime.conftest import hosts, wait_for

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent


class Lines:
    """Collects a process's stdout lines from a reader thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.strip())

    def acks(self) -> list[int]:
        return [int(x.split()[1]) for x in list(self.lines) if x.startswith("ack ")]


def start_host_process(redis_url: str, key_prefix: str, sid: str, ttl: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "host_process.py"), redis_url, key_prefix, sid, str(ttl)],
                            stdout=subprocess.PIPE, text=True, cwd=HERE.parent.parent)


async def gone(redis: Any, key: str) -> bool:
    return await redis.exists(key) == 0


async def test_frozen_owner_resumed_after_takeover_writes_nothing(redis: Any, redis_url: str, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    ttl = 1000
    sid = str(uuid.uuid4())
    proc = start_host_process(redis_url, key_prefix, sid, ttl)
    try:
        out = Lines(proc)
        ready = await wait_for(lambda: next((x for x in out.lines if x.startswith("ready ")), None),
                               within=15, what="host process ready")
        zombie_incarnation = ready.split()[1]
        await wait_for(lambda: len(out.acks()) >= 3, what="zombie's first acks")
        os.kill(proc.pid, signal.SIGSTOP)
        acked_before = set(out.acks())
        await wait_for(lambda: gone(redis, keys.liveness(zombie_incarnation)), within=ttl / 1000 + 3,
                       what="frozen owner's liveness to expire")
        async with hosts(redis, key_prefix, 1, lease_ttl_ms=ttl, switch_rate_per_s=0) as (survivor,):
            mine = [(await survivor.ask(sid, Switch())).outcome["version"] for _ in range(5)]
            os.kill(proc.pid, signal.SIGCONT)
            await wait_for(lambda: len(set(out.acks()) - acked_before) >= 5, within=10,
                           what="resumed process to be served through the new owner")
            assert (await survivor.scripts.do_read_lease(sid))[0] == survivor.incarnation
            assert zombie_incarnation not in [i["incarnation"] for i in await survivor.instances()]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)
    versions = [json.loads(f[b"m"])["version"] for _, f in await redis.xrange(keys.outbox)]
    assert versions == list(range(1, len(versions) + 1))  # never a version written twice
    acked = out.acks() + mine
    assert len(acked) == len(set(acked))  # no outcome acknowledged twice
    assert set(acked) <= set(versions)  # everything acknowledged is durable
