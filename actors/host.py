"""The host: one per process. Owns membership, the actor registry, the timer heap and the router.

    async with Host(redis, key_prefix=settings.key_prefix) as host:
        reply = await host.ask(session_id, kairos.Start())

Everything it runs lives in one anyio task group opened by `__aenter__` and cancelled by
`__aexit__` (structured concurrency: no task outlives the host). The Redis client must return
bytes (`decode_responses=False`, the default).
"""

from __future__ import annotations

import gc
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
from redis.exceptions import ConnectionError as RedisConnectionError

from actors.actor import Actor, Lease, Reply
from actors.connection import connection_kwargs, pubsub_client, unavailable
from actors.keys import Keys, Scripts
from actors.membership import Membership
from actors.metrics import DRAIN_SECONDS, LEASES_CLAIMED, LIVENESS_LOST
from actors.router import Router
from actors.store import RedisStore
from actors.supervise import supervised
from actors.sweeper import Sweeper
from actors.timers import Timers
from kairos import codec
from kairos.commands import Command
from kairos.errors import SessionNotFound, Unavailable
from kairos.rules import IDEMPOTENCY_WINDOW_MS
from kairos.session import Session

__all__ = ["Host", "Reply"]

# Activations between two gc.freeze() calls: long-lived actor objects leave the GC's young
# generations so full collections stay short at 100k sessions.
_FREEZE_EVERY = 5_000
# Hand-offs in flight at once while draining (and actors closed between two yields when stopping).
_DRAIN_BATCH = 256


def wall_ms() -> int:
    """Server wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class Host:
    """Runs the actors of this process and routes commands to whichever host owns a session."""

    def __init__(
        self,
        redis: Any,
        *,
        key_prefix: str = "kairos:",
        lease_ttl_ms: int = 5000,
        instance_id: str | None = None,
        clock: Callable[[], int] = wall_ms,
        clock_synced: Callable[[], bool] = lambda: True,
        restore: Callable[[str], Awaitable[Session | None]] | None = None,
        switch_rate_per_s: int = 10,
        passivate_after_ms: int = 60_000,
        idempotency_window_ms: int = IDEMPOTENCY_WINDOW_MS,
        mailbox_limit: int = 10_000,
        ask_deadline_ms: int = 10_000,
        forward_timeout_ms: int = 2_000,
        min_replicas_ack: int = 0,
        partitions: int = 1,
    ) -> None:
        if connection_kwargs(redis).get("decode_responses"):
            raise ValueError("Host needs a Redis client with decode_responses=False")
        self.redis = redis
        # The reply subscription's client: `redis` itself, or on a cluster one connection to any node.
        self.pubsub_redis = pubsub_client(redis)
        self.keys = Keys(key_prefix, partitions)
        self.scripts = Scripts(redis, self.keys, min_replicas_ack=min_replicas_ack)
        self.store = RedisStore(self.scripts, self.spawn)
        self._clock = clock
        self._clock_synced = clock_synced
        self.timers = Timers(clock)
        self.restore = restore
        self.switch_rate_per_s = switch_rate_per_s
        self.passivate_after_ms = passivate_after_ms
        self.idempotency_window_ms = idempotency_window_ms
        self.mailbox_limit = mailbox_limit
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.draining = False
        self.membership = Membership(
            self.scripts, instance_id=self.instance_id, ttl_ms=lease_ttl_ms,
            info=self._info, on_lost=self._stop_incarnation,
        )
        self.router = Router(self, deadline_ms=ask_deadline_ms, attempt_timeout_ms=forward_timeout_ms)
        self.sweeper = Sweeper(self, period_ms=max(50, lease_ttl_ms // 4), horizon_ms=2 * lease_ttl_ms)
        self._actors: dict[str, Actor] = {}
        self._locks: dict[str, tuple[anyio.Lock, list[int]]] = {}
        self._activations = 0
        self._successors: list[str] = []  # live, non-draining instances (set by drain())
        self._tg: anyio.abc.TaskGroup | None = None

    # --- lifetime --------------------------------------------------------------------------
    async def __aenter__(self) -> Host:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await self.scripts.do_check_layout()
            await self.membership.join()
            await tg.start(self.router.run_replies)
            tg.start_soon(supervised, self.membership.run, "liveness renewal")
            tg.start_soon(supervised, self.timers.run, "timers")
            tg.start_soon(supervised, self.router.run_inbox, "inbox")
            tg.start_soon(supervised, self.sweeper.run, "sweeper")
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            self._tg = None
            raise
        gc.freeze()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        with anyio.CancelScope(shield=True):  # stopping must finish even when cancelled
            for n, actor in enumerate(list(self._actors.values()), 1):
                actor.close()
                if n % _DRAIN_BATCH == 0:
                    await anyio.lowlevel.checkpoint()  # 100k actors: let the loop breathe
        tg = self._tg
        assert tg is not None
        tg.cancel_scope.cancel()  # tasks spawned from here on start cancelled: nothing runs
        try:
            await tg.__aexit__(None, None, None)
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self.membership.leave()
                except Exception:
                    pass  # Redis gone: the liveness key expires by itself
                await self.scripts.aclose()
                if self.pubsub_redis is not self.redis:
                    await self.pubsub_redis.aclose()
        return None

    # --- public API ------------------------------------------------------------------------
    @property
    def incarnation(self) -> str:
        return self.membership.incarnation

    async def ask(self, session_id: str, command: Command) -> Reply:
        """Run `command` on the session wherever it lives; raises kairos.errors.*."""
        return await self.router.ask(session_id, command)

    async def get(self, session_id: str, *, stored: bool = False) -> Session:
        """The session's current (last durable) state; SessionNotFound if there is none. With
        `stored`, read the checkpoint even when a local actor holds the session: the actor's
        copy changes only when its write's reply arrives, which can be after the write's update
        message reached this instance's sockets."""
        actor = None if stored else self.local_actor(session_id)
        if actor is not None and actor.state is not None:
            return actor.state
        try:
            try:
                raw = await self.scripts.do_load_checkpoint(session_id)
            except RedisConnectionError:
                # A pooled connection from before a Redis restart fails once and is dropped; a
                # read is safe to send again (on a fresh connection).
                raw = await self.scripts.do_load_checkpoint(session_id)
        except Exception as e:
            if not unavailable(e):
                raise
            raise Unavailable("Session store unreachable, please retry", retry_after=1) from e
        if raw is not None:
            return codec.decode(raw)
        if self.restore is not None and not await self.scripts.was_deleted(session_id):
            state = await self.restore(session_id)
            if state is not None:
                return state
        raise SessionNotFound(session_id)

    async def instances(self) -> list[dict[str, Any]]:
        """Live instances: instance_id, incarnation, draining, actors."""
        return await self.membership.instances()

    async def owner(self, session_id: str) -> dict[str, Any] | None:
        """Who holds the session's lease: {incarnation, epoch, instance_id, alive}; None if nobody."""
        incarnation, epoch = await self.scripts.do_read_lease(session_id)
        if not incarnation:
            return None
        live = {i["incarnation"]: i for i in await self.instances()}
        info = live.get(incarnation)
        return {"incarnation": incarnation, "epoch": epoch, "alive": info is not None,
                "instance_id": info["instance_id"] if info else None}

    def is_local(self, session_id: str) -> bool:
        """Whether a command for the session would run here without forwarding (metrics label)."""
        return session_id in self._actors

    def actor_count(self) -> int:
        """Actors live on this host."""
        return len(self._actors)

    async def drain(self) -> None:
        """Stop claiming; hand every local session to a live, non-draining instance (rendezvous
        hashing over the live list), which activates it at once. Returns when none is left here;
        bound it with a timeout. Commands caught in between get MOVED and are re-routed."""
        self.draining = True
        started = time.monotonic()
        try:
            await self.membership.renew()  # publish the draining flag now, not at the next renewal
        except Exception:
            pass
        while self._actors:
            me = self.incarnation
            targets = [i["incarnation"] for i in await self.instances()
                       if not i.get("draining") and i.get("synced", True) and i["incarnation"] != me]
            self._successors = targets
            # Bounded batches, each awaited before the next starts: at 100k actors, one task per
            # actor started at once blocked the loop for seconds (renewal, inbox and timers
            # starved; cancelling them at the drain timeout took as long again).
            actors = list(self._actors.values())
            for first in range(0, len(actors), _DRAIN_BATCH):
                async with anyio.create_task_group() as tg:
                    for actor in actors[first:first + _DRAIN_BATCH]:
                        tg.start_soon(actor.hand_off, rendezvous(actor.session_id, targets) if targets else None)
        DRAIN_SECONDS.observe(time.monotonic() - started)

    async def ping(self) -> None:
        """Raise if Redis is unreachable (for /ready)."""
        await self.redis.ping()

    @property
    def claiming(self) -> bool:
        """Whether this host may take sessions: not draining, and its clock is in the cluster's
        time base (`actors.clock`; a host that cannot tell the time must not charge it)."""
        return not self.draining and self._clock_synced()

    def wake_timers(self) -> None:
        """Re-check deadlines and idle actors now (after an injected clock moved)."""
        self.timers.poke()

    # --- for the router and the actors (actors.actor.Runtime) ------------------------------
    def clock(self) -> int:
        return self._clock()

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        assert self._tg is not None, "Host not started"
        self._tg.start_soon(fn)

    def local_actor(self, session_id: str) -> Actor | None:
        """The local actor, unless our liveness may have lapsed (then memory is not trusted)."""
        actor = self._actors.get(session_id)
        if actor is None or not self.membership.trusted():
            return None
        return actor

    def activate(self, session_id: str, lease: Lease, checkpoint: bytes | None, reason: str) -> Actor:
        """Start the actor for a session we just claimed (replacing any stale one)."""
        state = codec.decode(checkpoint) if checkpoint is not None else None
        old = self._actors.get(session_id)
        if old is not None:
            old.close()
        LEASES_CLAIMED.labels(reason).inc()
        actor = Actor(self, session_id, lease, state)
        if reason in ("released", "new"):
            actor.released_until = self._clock()
        self._actors[session_id] = actor
        actor.start()
        self._activations += 1
        if self._activations % _FREEZE_EVERY == 0:
            gc.freeze()
        return actor

    def on_closed(self, actor: Actor) -> None:
        if self._actors.get(actor.session_id) is actor:
            del self._actors[actor.session_id]

    async def on_liveness_lost(self, incarnation: str) -> None:
        await self.membership.lost(incarnation)

    def successor(self, session_id: str) -> str | None:
        """While draining: the live instance that takes `session_id` over (None otherwise)."""
        targets = [t for t in self._successors if t not in self.scripts.dead]
        if not self.draining or not targets:
            return None
        return rendezvous(session_id, targets)

    def claim_lock(self, session_id: str) -> _ClaimLock:
        """Serialises claims of one session within this host (claims elsewhere are fenced)."""
        return _ClaimLock(self._locks, session_id)

    # --- internals -------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {"draining": self.draining, "synced": self._clock_synced(), "actors": len(self._actors)}

    async def _stop_incarnation(self, incarnation: str) -> None:
        LIVENESS_LOST.inc()
        for actor in list(self._actors.values()):
            if actor.lease.incarnation == incarnation:
                actor.close()


def rendezvous(session_id: str, incarnations: list[str]) -> str:
    """Highest-random-weight choice: every instance picks the same target for a session, and
    removing one target only moves the sessions that were mapped to it."""
    return max(incarnations, key=lambda inc: hashlib.blake2b(f"{inc}:{session_id}".encode(), digest_size=8).digest())


class _ClaimLock:
    """A per-session lock that exists only while someone holds or waits for it."""

    __slots__ = ("_locks", "_sid", "_entry")

    def __init__(self, locks: dict[str, tuple[anyio.Lock, list[int]]], session_id: str) -> None:
        self._locks = locks
        self._sid = session_id

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._sid)
        if entry is None:
            entry = self._locks[self._sid] = (anyio.Lock(), [0])
        entry[1][0] += 1
        self._entry = entry
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._entry[0].release()
        self._leave()

    def _leave(self) -> None:
        self._entry[1][0] -= 1
        if self._entry[1][0] == 0 and self._locks.get(self._sid) is self._entry:
            del self._locks[self._sid]
