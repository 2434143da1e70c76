"""The session actor: a passive object with a mailbox; a task runs only while the mailbox is non-empty.

Commands are processed one at a time: `kairos.apply` on the in-memory state, then one fenced
write (checkpoint + outbox + publish + deadline) through the `Store`, then the reply. Nothing is
acknowledged before its write returned OK; a rejected write closes the actor at once and the
command (and everything queued behind it) is answered `Moved`, never acknowledged.

Written against anyio only (no Redis here): the host gives it a Redis store, the scheduling tests
an in-memory one, on asyncio and trio alike.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from actors.metrics import DEADLINE_LATENESS, DEADLINE_MISSED_WHILE_STOPPED
from kairos import codec, rules, wire
from kairos.commands import Command, Create, Delete, Switch, Tick
from kairos.errors import KairosError, RateLimited, SessionExists, SessionNotFound, Unavailable
from kairos.session import Session

log = logging.getLogger(__name__)

WRITTEN, FENCED, LIVENESS_LOST = 1, 0, -1
# Longest a command may take (restore hook + write); past it the outcome counts as unknown.
WRITE_TIMEOUT_S = 10.0


class Moved(Exception):
    """This actor no longer owns the session (passivated, fenced, liveness lost): route again."""


@dataclass(slots=True)
class Reply:
    """Answer to a command: the state after it (None once deleted), `Result.outcome`, server time."""

    state: Session | None
    outcome: dict[str, Any]
    now_ms: int
    # Internal: the answer already published to a forwarding asker inside the fenced write.
    published: bytes | None = None
    # Answered by the owner on another instance (the command metrics' `path` label).
    forwarded: bool = False


# Builds (reply channel, answer bytes) for a forwarded command from its Reply and checkpoint bytes,
# so the fenced write can publish the answer too (saves the owner a round trip).
ReplyTo = Callable[[Reply, bytes], tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Lease:
    """What fences our writes: the incarnation that claimed the session and the epoch it got."""

    incarnation: str
    epoch: int


class Store(Protocol):
    """Where an actor makes its changes durable; every call is fenced by `lease`.

    Each returns WRITTEN (1), FENCED (0: the lease is no longer ours) or LIVENESS_LOST (-1)."""

    async def write(
        self, lease: Lease, session_id: str, checkpoint: bytes, message: bytes, deadline_ms: int | None,
        reply: tuple[str, bytes] | None = None, *, version: int | None = None,
    ) -> int: ...

    async def delete(self, lease: Lease, session_id: str, message: bytes) -> int: ...

    async def release(self, lease: Lease, session_id: str) -> None: ...

    async def hand_off(self, lease: Lease, session_id: str, target: str | None) -> None: ...

    async def was_deleted(self, session_id: str) -> bool: ...


class Runtime(Protocol):
    """What an actor needs from its host (one object shared by all of a host's actors)."""

    store: Store
    timers: Any  # actors.timers.Timers
    switch_rate_per_s: int
    passivate_after_ms: int
    mailbox_limit: int
    idempotency_window_ms: int  # how long command ids are remembered at least (kairos.rules)
    restore: Callable[[str], Awaitable[Session | None]] | None

    def clock(self) -> int: ...

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None: ...

    def on_closed(self, actor: Actor) -> None: ...

    async def on_liveness_lost(self, incarnation: str) -> None: ...


SWITCH_LIMIT_MESSAGE = "Too many cycle switches for this session, please slow down"


class _Slot:
    """One pending answer."""

    __slots__ = ("done", "reply", "error", "reply_to")

    def __init__(self, reply_to: ReplyTo | None = None) -> None:
        self.done = anyio.Event()
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.reply_to = reply_to


_TICK = object()
_PASSIVATE = object()
_HAND_OFF = object()


class Actor:
    """One live session on this host. Passive: no task while its mailbox is empty."""

    __slots__ = (
        "session_id", "rt", "lease", "state", "closed", "armed", "deadline", "last_used",
        "_box", "_running", "_switches", "_restore_tried", "released_until",
    )

    def __init__(self, rt: Runtime, session_id: str, lease: Lease, state: Session | None) -> None:
        self.session_id = session_id
        self.rt = rt
        self.lease = lease
        self.state = state
        self.closed = False
        self.armed: int | None = None
        self.deadline: int | None = None
        self.last_used = rt.clock()
        # Created on first queued item and dropped when drained: an empty deque is ~600 B, half
        # of what an idle actor would otherwise cost.
        self._box: deque[tuple[Any, _Slot | None]] | None = None
        self._running = False
        self._switches: list[int] | None = None  # accepted switch times in the last second
        self._restore_tried = False
        # Claimed after a clean release (not from a dead owner): the claim time. A deadline that
        # passed before it was missed while nothing ran, which is downtime, not lateness.
        self.released_until = 0

    # --- public ----------------------------------------------------------------------------
    def start(self) -> None:
        """Arm the first wake-up (deadline of the loaded state, or idle passivation)."""
        self.deadline = rules.next_deadline(self.state) if self.state is not None else None
        self._rearm(self.rt.clock())

    async def ask(self, command: Command, reply_to: ReplyTo | None = None) -> Reply:
        """Run `command` after those queued before it. Raises KairosError, or Moved if not owner.
        `reply_to` (forwarded commands): publish the answer within the write itself."""
        self.last_used = self.rt.clock()
        if not self._running and not self._box and not self.closed:
            # Idle mailbox: the caller runs its own command (no task spawn, no hand-off), shielded
            # so a cancelled caller can never abandon a write whose outcome is then unknown (a
            # hung Redis still ends it: a timeout is an unknown outcome, which closes the actor).
            self._running = True
            try:
                # A bare scope, not anyio.fail_after (two generator context managers: +5 us on
                # every command). Being shielded, only its deadline can cancel it.
                with anyio.CancelScope(deadline=anyio.current_time() + WRITE_TIMEOUT_S, shield=True):
                    return await self._step(command, reply_to)
                raise self._timed_out()
            finally:
                self._running = False
                if self._box or (self.state is None and not self.closed):
                    self._running = True  # others queued meanwhile (or a lease to free): a task
                    self.rt.spawn(self._run)
        slot = _Slot(reply_to)
        self._post(command, slot)
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.reply is not None
        return slot.reply

    def close(self) -> None:
        """Stop at once without writing or acknowledging anything more (queued asks get Moved)."""
        if not self.closed:
            self.closed = True
            self.rt.on_closed(self)
        self._fail_queued()

    def _fail_queued(self) -> None:
        while self._box:
            _, slot = self._box.popleft()
            if slot is not None:
                slot.error = Moved(self.session_id)
                slot.done.set()

    def on_wake(self, now_ms: int) -> None:
        """Timer callback: tick a due deadline, passivate when idle, or re-arm."""
        if self.closed:
            return
        after = self.rt.passivate_after_ms
        try:
            if self.deadline is not None and self.deadline <= now_ms:
                self._post(_TICK, None)
                return
            if (
                after
                and self.last_used + after <= now_ms
                and not self._running
                and (self.deadline is None or self.deadline - now_ms > after)
            ):
                self._post(_PASSIVATE, None)
                return
        except Unavailable:  # mailbox full: try again in a moment
            self.rt.timers.arm(self, now_ms + 10)
            return
        self._rearm(now_ms)

    async def hand_off(self, target: str | None) -> None:
        """Finish the command in hand, then stop and give the lease to `target` (drain), or just
        release it. Queued and later commands get Moved: the router re-routes them to the target."""
        if self.closed:
            return
        if not self._running and not self._box:  # idle (most actors in a drain): no task needed
            lease = self.lease
            self.close()
            # Shielded: a drain cut by its timeout must not leave a closed actor's lease naming us.
            with anyio.CancelScope(shield=True), anyio.move_on_after(WRITE_TIMEOUT_S):
                try:
                    await self.rt.store.hand_off(lease, self.session_id, target)
                except Exception as e:  # Redis unreachable: the lease lapses with our liveness
                    log.warning("handing %s off failed: %r", self.session_id, e)
            return
        slot = _Slot()
        self._post((_HAND_OFF, target), slot)
        await slot.done.wait()

    @property
    def busy(self) -> bool:
        return self._running

    # --- mailbox ---------------------------------------------------------------------------
    def _post(self, item: Any, slot: _Slot | None) -> None:
        if self.closed:
            raise Moved(self.session_id)
        box = self._box
        if box is None:
            box = self._box = deque()
        elif len(box) >= self.rt.mailbox_limit:
            raise Unavailable("Session is overloaded, please retry", retry_after=1)
        box.append((item, slot))
        if not self._running:
            self._running = True
            self.rt.spawn(self._run)

    async def _run(self) -> None:
        box = self._box
        if box is None:
            box = self._box = deque()
        try:
            while box and not self.closed:
                item, slot = box.popleft()
                try:
                    if item is _TICK:
                        await self._tick()
                    elif item is _PASSIVATE:
                        await self._passivate()
                    elif type(item) is tuple and item[0] is _HAND_OFF:
                        lease = self.lease
                        self.close()
                        await self.rt.store.hand_off(lease, self.session_id, item[1])
                    else:
                        with anyio.fail_after(WRITE_TIMEOUT_S):
                            reply = await self._step(item, slot.reply_to if slot is not None else None)
                        if slot is not None:
                            slot.reply = reply
                except (KairosError, Moved) as e:
                    if slot is not None:
                        slot.error = e
                except TimeoutError:
                    error = self._timed_out()
                    if slot is not None:
                        slot.error = error
                except Exception:
                    log.exception("actor %s failed", self.session_id)
                    self.close()
                    if slot is not None:
                        slot.error = Unavailable(f"Session {self.session_id} unavailable", retry_after=1)
                finally:
                    if slot is not None:
                        slot.done.set()
            if self.state is None and not self.closed:
                try:
                    await self._passivate()  # nothing to keep (unknown id, deleted): free the lease now
                except Exception as e:  # Redis unreachable: an error escaping a spawned task would
                    # cancel the host's task group; the lease is re-claimed ('self') by the next ask
                    log.warning("releasing %s failed: %r", self.session_id, e)
        finally:
            self._running = False
            if self.closed:
                self._fail_queued()  # answer anything that slipped in
            elif box:
                self._running = True
                self.rt.spawn(self._run)
            elif self._box is box:
                self._box = None

    async def _step(self, command: Command, reply_to: ReplyTo | None = None) -> Reply:
        """One command; raises KairosError / Moved, or Unavailable after an unknown outcome."""
        try:
            return await self._handle(command, reply_to)
        except (KairosError, Moved):
            raise
        except Exception as e:
            # Unknown outcome (e.g. Redis connection dropped mid-write): our memory may be ahead of
            # the checkpoint, so drop the actor; the next ask reloads it from Redis.
            log.exception("actor %s failed", self.session_id)
            self.close()
            raise Unavailable(f"Session {self.session_id} unavailable: {e!r}", retry_after=1) from e

    def _timed_out(self) -> Unavailable:
        log.error("command on %s timed out: outcome unknown, dropping the actor", self.session_id)
        self.close()
        return Unavailable(f"Session {self.session_id} unavailable (store timed out)", retry_after=1)

    def _rearm(self, now_ms: int) -> None:
        after = self.rt.passivate_after_ms
        at = self.deadline
        if after:
            idle_at = max(self.last_used + after, now_ms + 1)
            at = idle_at if at is None else min(at, idle_at)
        if at is not None:
            self.rt.timers.arm(self, at)

    # --- processing ------------------------------------------------------------------------
    async def _handle(self, command: Command, reply_to: ReplyTo | None = None) -> Reply:
        rt = self.rt
        now = rt.clock()
        state = self.state
        cid = command.command_id
        if isinstance(command, Create):
            if state is not None:
                if cid is not None and cid in state.recent:
                    return Reply(state, state.recent[cid], now)
                raise SessionExists(f"Session {self.session_id} already exists")
        elif state is None:
            state = await self._restore()
            if state is None:
                if isinstance(command, Delete):
                    return Reply(None, {"version": 0, "expired_participant_id": None}, now)
                raise SessionNotFound(self.session_id)
        replay = cid is not None and state is not None and cid in state.recent
        if isinstance(command, Switch) and rt.switch_rate_per_s and not replay:
            self._check_switch_rate(now)
        result = rules.apply(state, command, now, window_ms=rt.idempotency_window_ms)
        if not result.changed:
            return Reply(result.state, result.outcome, now)
        reply = await self._persist(result, now, reply_to)
        if isinstance(command, Switch) and rt.switch_rate_per_s:
            self._switches.append(now)  # type: ignore[union-attr]
        return reply

    async def _tick(self) -> None:
        state = self.state
        if state is None:
            return
        now = self.rt.clock()
        due = self.deadline
        result = rules.apply(state, Tick(), now)
        if result.changed:
            await self._persist(result, now)
            if due is not None:
                late = max(0, now - due) / 1000
                if due < self.released_until:
                    DEADLINE_MISSED_WHILE_STOPPED.observe(late)
                else:
                    DEADLINE_LATENESS.observe(late)
        else:
            # Guard against a deadline that apply() does not honour: never spin on it.
            if self.deadline is not None and self.deadline <= now:
                log.error("deadline %s of %s not applied by tick", self.deadline, self.session_id)
                self.deadline = None
            self._rearm(now)

    async def _persist(self, result: rules.Result, now: int, reply_to: ReplyTo | None = None) -> Reply:
        """The one fenced write of an accepted change; updates memory only once it is durable."""
        new = result.state
        reply = Reply(new, result.outcome, now)
        message = wire.update_message(new, result.events, now, self.session_id)
        if new is None:
            code = await self.rt.store.delete(self.lease, self.session_id, message)
            self._check(code)
            self.state = None
            self.deadline = None
            self.close()  # the delete script released the lease
            return reply
        deadline = rules.next_deadline(new)
        checkpoint = codec.encode(new)
        answer = None
        if reply_to is not None:
            answer = reply_to(reply, checkpoint)
            reply.published = answer[1]
        code = await self.rt.store.write(self.lease, self.session_id, checkpoint, message, deadline, answer,
                                         version=new.version)
        self._check(code)
        self.state = new
        self.deadline = deadline
        self._rearm(now)
        return reply

    def _check(self, code: int) -> None:
        if code == WRITTEN:
            return
        lease = self.lease
        self.close()
        if code == LIVENESS_LOST:
            self.rt.spawn(lambda: self.rt.on_liveness_lost(lease.incarnation))
        raise Moved(self.session_id)

    def _check_switch_rate(self, now: int) -> None:
        window = self._switches
        if window is None:
            window = self._switches = []  # a short list: cheaper than a deque per session
        drop = 0
        while drop < len(window) and window[drop] <= now - 1000:
            drop += 1
        if drop:
            del window[:drop]
        if len(window) >= self.rt.switch_rate_per_s:
            raise RateLimited(SWITCH_LIMIT_MESSAGE, retry_after=1)

    async def _restore(self) -> Session | None:
        """No checkpoint: ask the restore hook (audit snapshot) once, and re-seed the checkpoint."""
        restore = self.rt.restore
        if restore is None or self._restore_tried:
            return None
        self._restore_tried = True
        if await self.rt.store.was_deleted(self.session_id):
            return None
        state = await restore(self.session_id)
        if state is None:
            return None
        deadline = rules.next_deadline(state)
        self._check(await self.rt.store.write(self.lease, self.session_id, codec.encode(state), b"", deadline))
        self.state = state
        self.deadline = deadline
        return state

    async def _passivate(self) -> None:
        if self._box:
            return  # a command arrived meanwhile: stay
        await self._release()

    async def _release(self) -> None:
        # Every accepted change is already checkpointed, so stopping is just giving the lease up.
        lease = self.lease
        self.close()
        await self.rt.store.release(lease, self.session_id)
