"""Mailbox and deadline machinery on asyncio AND trio, against an in-memory store double.

The double is used only here, to test scheduling (serial mailbox, timer heap, passivation, what a
rejected write does); everything that talks to Redis is tested against a real Redis elsewhere.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from actors.actor import FENCED, LIVENESS_LOST, WRITTEN, Actor, Lease, Moved
from actors.timers import Timers
from kairos import codec
from kairos.commands import Start, Switch
from kairos.errors import RateLimited, Unavailable
from kairos.session import Status
from tests.runtime.conftest import FakeClock, create_command, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class MemoryStore:
    """Fenced like the Redis scripts: a write counts only under the current lease."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.checkpoints: dict[str, bytes] = {}
        self.messages: list[bytes] = []
        self.released: list[str] = []
        self.answer: int | None = None  # force a reply code (e.g. LIVENESS_LOST)

    async def write(self, lease: Lease, sid: str, checkpoint: bytes, message: bytes, deadline: int | None,
                    reply: Any = None, *, version: int | None = None) -> int:
        await anyio.lowlevel.checkpoint()  # a real await point, so interleavings can happen
        if self.answer is not None:
            return self.answer
        if self.leases.get(sid) != lease:
            return FENCED
        self.checkpoints[sid] = checkpoint
        self.messages.append(message)
        return WRITTEN

    async def delete(self, lease: Lease, sid: str, message: bytes) -> int:
        if self.leases.get(sid) != lease:
            return FENCED
        self.checkpoints.pop(sid, None)
        return WRITTEN

    async def release(self, lease: Lease, sid: str) -> None:
        if self.leases.get(sid) == lease:
            self.released.append(sid)


class MemoryRuntime:
    def __init__(self, spawn: Callable[[Callable[[], Awaitable[None]]], None], clock: FakeClock, **opts: Any) -> None:
        self.store = MemoryStore()
        self.clock = clock
        self.timers = Timers(clock, max_sleep_s=0.05)
        self.switch_rate_per_s = opts.get("switch_rate_per_s", 0)
        self.passivate_after_ms = opts.get("passivate_after_ms", 60_000)
        self.idempotency_window_ms = 300_000
        self.mailbox_limit = 10_000
        self.restore = None
        self.spawn = spawn
        self.closed: list[Actor] = []
        self.lost: list[str] = []

    def on_closed(self, actor: Actor) -> None:
        self.closed.append(actor)

    async def on_liveness_lost(self, incarnation: str) -> None:
        self.lost.append(incarnation)


@asynccontextmanager
async def runtime(**opts: Any) -> AsyncIterator[MemoryRuntime]:
    async with anyio.create_task_group() as tg:
        rt = MemoryRuntime(tg.start_soon, FakeClock(), **opts)
        tg.start_soon(rt.timers.run)
        yield rt
        tg.cancel_scope.cancel()


async def new_actor(rt: MemoryRuntime, **create: Any) -> Actor:
    sid = str(uuid.uuid4())
    lease = Lease("inc-1", 1)
    rt.store.leases[sid] = lease
    actor = Actor(rt, sid, lease, None)
    actor.start()
    await actor.ask(create_command(sid, **create))
    return actor


async def test_concurrent_commands_are_applied_one_at_a_time_in_version_order() -> None:
    async with runtime() as rt:
        actor = await new_actor(rt)
        await actor.ask(Start())
        versions: list[int] = []

        async def one() -> None:
            versions.append((await actor.ask(Switch())).outcome["version"])

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
        assert sorted(versions) == list(range(3, 203))
        assert len(rt.store.messages) == 202  # create + start + 200 switches, each written once
        assert codec.decode(rt.store.checkpoints[actor.session_id]).version == 202
        assert not actor.busy  # no task left behind once the mailbox is empty


async def test_deadline_fires_without_any_command() -> None:
    async with runtime() as rt:
        actor = await new_actor(rt, bank_ms=1000)
        started = await actor.ask(Start())
        deadline = started.now_ms + 1000
        assert actor.deadline == deadline
        rt.clock.advance(999)
        assert rt.timers.fire_due() == 0
        assert actor.state.status is Status.RUNNING
        rt.clock.advance(1)
        rt.timers.poke()
        await wait_for(lambda: actor.state.status is Status.EXPIRED, what="expiry")
        assert actor.state.updated_at_ms == deadline  # applied at the deadline, not later
        assert codec.decode(rt.store.checkpoints[actor.session_id]).status is Status.EXPIRED


async def test_idle_actor_passivates_and_releases_its_lease() -> None:
    async with runtime(passivate_after_ms=60_000) as rt:
        actor = await new_actor(rt)
        rt.clock.advance(59_999)
        assert rt.timers.fire_due() == 0  # 1 ms before the idle limit nothing is due
        assert not actor.closed and actor.armed is not None
        rt.clock.advance(1)
        rt.timers.poke()
        await wait_for(lambda: actor.closed, what="passivation")
        assert rt.store.released == [actor.session_id]
        assert rt.closed == [actor]


async def test_running_actor_with_near_deadline_is_not_passivated() -> None:
    async with runtime(passivate_after_ms=60_000) as rt:
        actor = await new_actor(rt, bank_ms=90_000)
        await actor.ask(Start())
        rt.clock.advance(60_000)  # idle long enough, but its flag falls in 30 s
        assert rt.timers.fire_due() == 1  # the idle check ran synchronously ...
        assert not actor.closed and actor.armed is not None  # ... and re-armed instead of passivating
        rt.clock.advance(30_000)
        rt.timers.poke()
        await wait_for(lambda: actor.state.status is Status.EXPIRED, what="expiry")


async def test_rejected_write_closes_actor_and_acknowledges_nothing() -> None:
    async with runtime() as rt:
        actor = await new_actor(rt)
        before = dict(rt.store.checkpoints)
        rt.store.leases[actor.session_id] = Lease("inc-2", 2)  # someone else took over
        with pytest.raises(Moved):
            await actor.ask(Start())
        assert actor.closed
        assert rt.store.checkpoints == before
        with pytest.raises(Moved):
            await actor.ask(Start())


async def test_lost_liveness_on_write_is_reported_and_not_acknowledged() -> None:
    async with runtime() as rt:
        actor = await new_actor(rt)
        rt.store.answer = LIVENESS_LOST
        with pytest.raises(Moved):
            await actor.ask(Start())
        await wait_for(lambda: rt.lost == ["inc-1"], what="liveness loss report")
        assert actor.state.status is Status.PENDING  # memory never ran ahead of the store


async def test_switch_rate_limit_is_exact_per_second_window() -> None:
    async with runtime(switch_rate_per_s=3) as rt:
        actor = await new_actor(rt)
        await actor.ask(Start())
        first = await actor.ask(Switch(command_id="s1"))
        await actor.ask(Switch())
        rt.clock.advance(500)
        await actor.ask(Switch())
        with pytest.raises(RateLimited) as info:
            await actor.ask(Switch())
        assert info.value.retry_after == 1
        assert (await actor.ask(Switch(command_id="s1"))).outcome == first.outcome  # replay is free
        rt.clock.advance(500)  # the first two left the window
        await actor.ask(Switch())
        await actor.ask(Switch())
        with pytest.raises(RateLimited):
            await actor.ask(Switch())


async def test_hung_store_gives_unavailable_and_drops_the_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    import actors.actor as actor_module

    monkeypatch.setattr(actor_module, "WRITE_TIMEOUT_S", 0.1)
    async with runtime() as rt:
        actor = await new_actor(rt)

        async def hang(*args: Any) -> int:
            await anyio.sleep_forever()
            return WRITTEN

        rt.store.write = hang  # type: ignore[method-assign]
        results: list[BaseException] = []

        async def one() -> None:
            try:
                await actor.ask(Start())
            except Exception as e:
                results.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)  # runs inline (idle mailbox)
            tg.start_soon(one)  # queued behind it
        assert actor.closed
        assert len(results) == 2
        assert any(isinstance(e, Unavailable) for e in results)
        assert all(isinstance(e, Unavailable | Moved) for e in results)
