"""Background loops started again after an error they let out, instead of a zombie instance."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest

from actors.supervise import supervised
from actors.sweeper import Sweeper
from kairos.commands import Start, Switch
from tests.runtime.conftest import create_command, hosts, wait_for

pytestmark = pytest.mark.anyio


async def test_a_loop_that_lets_an_error_out_is_started_again() -> None:
    runs: list[int] = []

    async def run() -> None:
        runs.append(1)
        if len(runs) == 1:  # what redis-py let out once under a cluster failover
            raise AttributeError("'NoneType' object has no attribute 'writelines'")

    with anyio.fail_after(5):
        await supervised(run, "audit worker", pause_s=0)
    assert len(runs) == 2


async def test_cancellation_goes_through() -> None:
    started = anyio.Event()

    async def run() -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervised, run, "forever")
            await started.wait()
            tg.cancel_scope.cancel()


async def test_a_host_whose_sweeper_failed_still_serves_forwarded_commands(
        redis: Any, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # an error escaping one of the Host's loops used to cancel its task group: inbox, renewal and
    # timers stopped while the process lived on, and commands forwarded to it answered 503
    sweeps: list[int] = []
    sweep = Sweeper.run

    async def fails_first(self: Sweeper) -> None:
        sweeps.append(1)
        if len(sweeps) == 1:
            raise RuntimeError("a bug in the sweeper")
        await sweep(self)

    monkeypatch.setattr(Sweeper, "run", fails_first)
    async with hosts(redis, key_prefix, 2) as (a, b):
        sid = str(uuid.uuid4())
        await a.ask(sid, create_command(sid))
        await a.ask(sid, Start())
        await wait_for(lambda: len(sweeps) >= 3, within=10, what="both sweepers running again")
        assert (await b.ask(sid, Switch())).outcome["version"] == 3  # forwarded to a's inbox
