"""The command router: local mailbox, or claim-or-forward to the owner over Redis, with retries.

Forwarding protocol (msgpack): the asker RPUSHes `{r: request id, s: session id, a: reply
channel, c: command}` onto the owner's inbox (inside the claim-or-forward script, so routing costs
one round trip); the owner's inbox loop runs the command and PUBLISHes `{r, k, ...}` on the reply
channel, `k` = 0 ok (`st` checkpoint bytes or nil, `o` outcome, `t` server ms), 1 error (`e` =
`KairosError.to_dict()`), 2 MOVED (not the owner any more: route again). Retries (timeout, MOVED,
dead owner) reuse the same request id and `command_id` (one is assigned if the caller gave none),
so the core's idempotency window makes them safe.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import msgpack

from actors.actor import Lease, Moved, Reply, ReplyTo
from actors.connection import unavailable
from actors.metrics import COMMANDS_RETRIED
from kairos import codec
from kairos.commands import (
    Cancel,
    Command,
    Complete,
    Create,
    Delete,
    ParticipantSpec,
    Pause,
    Resume,
    Start,
    Switch,
)
from kairos.errors import KairosError, Unavailable
from kairos.rules import ROUTER_ID_PREFIX

if TYPE_CHECKING:
    from actors.host import Host

log = logging.getLogger(__name__)

_COMMANDS: dict[str, type] = {
    c.__name__: c for c in (Create, Start, Switch, Pause, Resume, Complete, Cancel, Delete)
}

# claim-or-forward reply codes (see actors.keys.CLAIM_OR_FORWARD)
CLAIMED, FORWARDED, OWNED_ELSEWHERE, UNOWNED, MINE, NOT_ALIVE = 1, 2, 3, 4, 5, -1
REPLY_OK, REPLY_ERROR, REPLY_MOVED = 0, 1, 2
_MAX_HINTS = 100_000
_MAX_SERVED = 20_000
_INBOX_BATCH = 128
_MAX_IDLE_SERVERS = 8
_MAX_SERVING = 512  # inbox entries served at once; the inbox is read again as they finish
# Looked at again this long after a silent owner's liveness key should have expired.
_EXPIRY_MARGIN_S = 0.05


def encode_command(command: Command) -> dict[str, Any]:
    """Plain dict form of a command (for the inbox)."""
    d: dict[str, Any] = {f.name: getattr(command, f.name) for f in fields(command) if f.init}
    if isinstance(command, Create):
        d["participants"] = [{f.name: getattr(p, f.name) for f in fields(p)} for p in command.participants]
    d["_t"] = type(command).__name__
    return d


def decode_command(d: dict[str, Any]) -> Command:
    """Inverse of `encode_command`."""
    d = dict(d)
    cls = _COMMANDS[d.pop("_t")]
    if cls is Create:
        d["participants"] = tuple(ParticipantSpec(**p) for p in d["participants"])
    return cls(**d)


def handoff_message(session_id: str) -> bytes:
    """Inbox entry asking the receiver to activate `session_id` at once (no command, no reply)."""
    return msgpack.packb({"r": uuid.uuid4().hex, "s": session_id, "a": "", "c": None})


class _Waiter:
    __slots__ = ("done", "msg")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.msg: dict[str, Any] | None = None


class _IdleServer:
    """A serving task waiting for its next inbox entry."""

    __slots__ = ("done", "raw")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.raw: bytes | None = None


class Router:
    """`ask()` for a host: local fast path, else claim-or-forward with retries to a deadline."""

    def __init__(self, host: Host, *, deadline_ms: int, attempt_timeout_ms: int) -> None:
        self.host = host
        self.deadline_s = deadline_ms / 1000
        self.attempt_s = attempt_timeout_ms / 1000
        # Replies come back on one channel per process (named after the first incarnation).
        self.reply_channel = host.keys.reply_channel(host.membership.incarnation)
        self._waiting: dict[str, _Waiter] = {}
        # session -> owner incarnation last seen; lets concurrent forwards skip the claim lock
        self._hints: dict[str, str] = {}
        # request id -> packed answer (None while running): duplicates of a forwarded request
        self._served: OrderedDict[str, bytes | None] = OrderedDict()
        self._serving = 0  # inbox entries being served now (a backlog hint for the inbox loop)
        self._room = anyio.Event()  # set when _serving drops below _MAX_SERVING
        # Serving tasks that finished an entry wait here for the next one (up to a few): handing
        # an entry over costs ~5 us, starting a task for it ~35 us.
        self._idle_servers: list[_IdleServer] = []

    # --- asking ---------------------------------------------------------------------------
    async def ask(self, session_id: str, command: Command, *, forward: bool = True,
                  reply_to: ReplyTo | None = None) -> Reply:
        """Run `command` on the session's owner. `forward=False` (serving an inbox entry): never
        forward again; raise Moved if another live instance owns it."""
        host = self.host
        stop = time.monotonic() + (self.deadline_s if forward else self.attempt_s)
        rid: str | None = None
        payload = b""
        fresh = None  # an actor we just activated: its state was read from Redis this instant
        try:
            while True:
                actor, fresh = fresh or host.local_actor(session_id), None
                if actor is not None:
                    try:
                        return await actor.ask(command, reply_to)
                    except Moved:
                        COMMANDS_RETRIED.labels("moved").inc()
                        continue
                left = stop - time.monotonic()
                if left <= 0:
                    raise Unavailable("Session owner unreachable, please retry", retry_after=1)
                try:
                    inc = host.membership.incarnation
                    if forward and rid is None:
                        if command.command_id is None:  # retries must be recognisable as such
                            command = replace(command, command_id=ROUTER_ID_PREFIX + uuid.uuid4().hex)
                        rid = uuid.uuid4().hex
                        payload = msgpack.packb({"r": rid, "s": session_id, "a": self.reply_channel,
                                                 "c": encode_command(command)})
                        self._waiting[rid] = _Waiter()
                    if forward and session_id in self._hints:
                        r = await host.scripts.do_claim_or_forward(inc, session_id, may_claim=False, payload=payload,
                                                                   owner_hint=self._hints[session_id])
                    else:
                        async with host.claim_lock(session_id):
                            if host.local_actor(session_id) is not None:
                                continue
                            if forward and session_id in self._hints:
                                continue  # someone learnt the owner meanwhile: forward without the lock
                            successor = host.successor(session_id) if forward else None
                            r = await host.scripts.do_claim_or_forward(
                                inc, session_id, may_claim=host.claiming or successor is not None,
                                payload=payload, claim_for=successor or "")
                            if r[0] == CLAIMED:
                                fresh = host.activate(session_id, Lease(inc, int(r[1])), r[2], r[3].decode())
                                continue
                    code = r[0]
                    if code == FORWARDED:
                        owner = r[1].decode()
                        if len(self._hints) >= _MAX_HINTS:
                            self._hints.clear()
                        self._hints[session_id] = owner
                        assert rid is not None
                        reply = await self._await_owner(rid, session_id, owner, int(r[2]), stop)
                        if reply is not None:
                            return reply
                        COMMANDS_RETRIED.labels("owner_gone").inc()
                        self._hints.pop(session_id, None)  # MOVED, owner gone, or out of time: look again
                    elif code == NOT_ALIVE:
                        await host.membership.lost(inc)
                    elif code == OWNED_ELSEWHERE:
                        raise Moved(session_id)
                    elif code in (UNOWNED, MINE):
                        self._hints.pop(session_id, None)
                        if not host.claiming:  # draining (our successor claims it shortly) or clock unsynced
                            if not forward:
                                raise Moved(session_id)
                            await anyio.sleep(0.01)
                except Exception as e:
                    if not unavailable(e):
                        raise
                    # Redis unreachable (or a cluster slot moving): keep trying until the deadline,
                    # then 503 (never a 500)
                    log.warning("routing %s failed: %r", session_id, e)
                    await anyio.sleep(0.05)
        finally:
            if rid is not None:
                self._waiting.pop(rid, None)

    async def _await_owner(self, rid: str, session_id: str, owner: str, pttl_ms: int, stop: float) -> Reply | None:
        """Wait for `owner`'s answer. None means route again: it answered MOVED, it is no longer
        the live owner, or time is up. A slow but live owner is never sent the command twice
        (a duplicate could fall out of the idempotency window before it is seen).

        A silent owner is looked at again just after its liveness key would expire (`pttl_ms`,
        read when the command was forwarded): a dead owner costs at most one lease TTL plus a
        round trip, at every TTL; a live one renewed its key and is waited for once more."""
        host = self.host
        waiter = self._waiting[rid]
        while True:
            left = stop - time.monotonic()
            if left <= 0:
                return None
            with anyio.move_on_after(min(left, pttl_ms / 1000 + _EXPIRY_MARGIN_S)):
                await waiter.done.wait()
            if waiter.msg is not None:
                break
            if waiter.done.is_set():  # our reply subscription was re-made: the answer may be lost
                self._waiting[rid] = _Waiter()
                return None  # route again: a re-sent request id is answered, never run twice
            r = await host.scripts.do_claim_or_forward(host.membership.incarnation, session_id, may_claim=False)
            if not (r[0] == OWNED_ELSEWHERE and r[1].decode() == owner):
                return None
            pttl_ms = int(r[2])
        msg = waiter.msg
        if msg["k"] == REPLY_MOVED:
            self._waiting[rid] = _Waiter()
            return None
        if msg["k"] == REPLY_ERROR:
            raise KairosError.from_dict(msg["e"])
        st = msg["st"]
        return Reply(codec.decode(st) if st is not None else None, msg["o"], msg["t"], forwarded=True)

    async def activate_here(self, session_id: str, reason: str = "handoff") -> bool:
        """Claim and activate a session on this host now, if nobody live owns it (drain hand-off)."""
        host = self.host
        if not host.claiming:
            return False
        async with host.claim_lock(session_id):
            if host.local_actor(session_id) is not None:
                return True
            inc = host.membership.incarnation
            r = await host.scripts.do_claim_or_forward(inc, session_id, may_claim=True)
            if r[0] != CLAIMED:
                return False
            host.activate(session_id, Lease(inc, int(r[1])), r[2], reason)
            return True

    # --- serving ---------------------------------------------------------------------------
    async def serve_forwarded(self, raw: bytes) -> None:
        """Run one inbox entry here and publish the answer on its reply channel."""
        msg = msgpack.unpackb(raw)
        if msg["c"] is None:
            await self.activate_here(msg["s"])
            return
        rid = msg["r"]
        served = self._served
        if rid in served:  # a re-sent request: never run it twice
            done = served[rid]
            if done is not None:
                await self._reply(msg["a"], done)
            return  # else still running: its answer goes to the same address
        served[rid] = None
        if len(served) > _MAX_SERVED:
            served.popitem(last=False)
        address = msg["a"]

        def answer(reply: Reply, checkpoint: bytes) -> tuple[str, bytes]:
            return address, msgpack.packb(
                {"r": rid, "k": REPLY_OK, "o": reply.outcome, "t": reply.now_ms, "st": checkpoint})

        try:
            reply = await self.ask(msg["s"], decode_command(msg["c"]), forward=False, reply_to=answer)
            if reply.published is not None:  # went out with the fenced write itself
                served[rid] = reply.published
                return
            out: dict[str, Any] = {
                "r": rid, "k": REPLY_OK, "o": reply.outcome, "t": reply.now_ms,
                "st": codec.encode(reply.state) if reply.state is not None else None,
            }
        except Moved:
            served.pop(rid, None)  # not run here: it may legitimately come back after re-routing
            out = {"r": rid, "k": REPLY_MOVED}
        except KairosError as e:
            out = {"r": rid, "k": REPLY_ERROR, "e": e.to_dict()}
        except Exception as e:
            log.exception("forwarded command failed")
            out = {"r": rid, "k": REPLY_ERROR, "e": Unavailable(f"Owner failed: {e!r}").to_dict()}
        data = msgpack.packb(out)
        if rid in served:
            served[rid] = data
        await self._reply(msg["a"], data)

    async def _reply(self, address: str, data: bytes) -> None:
        """Publish an answer, trying again (another node, on a cluster) until the routing deadline:
        its asker waits for it while we live, so a lost one cost it that deadline (repeats are ignored)."""
        stop = time.monotonic() + self.deadline_s
        while True:
            try:
                return await self.host.scripts.do_reply(address, data)
            except Exception as e:
                if not unavailable(e) or time.monotonic() >= stop:
                    raise
                await anyio.sleep(0.05)

    async def run_inbox(self) -> None:
        """Pop forwarded commands from our inbox (it follows incarnation changes)."""
        host = self.host
        busy = False  # a backlog was seen: drain it in batches (one round trip per batch)
        while True:
            if self._serving >= _MAX_SERVING:
                # A burst (a peer draining 100k sessions here): take more only as these finish,
                # or thousands of tasks waking at once stall the loop (renewal, timers, replies).
                self._room = anyio.Event()
                await self._room.wait()
            inc = host.membership.incarnation
            try:
                if busy:
                    batch = await host.scripts.do_pop_inbox_batch(inc, _INBOX_BATCH)
                else:
                    batch = await host.scripts.do_pop_inbox(inc, 1)
            except Exception as e:
                log.warning("inbox read failed: %r", e)
                await anyio.sleep(0.2)
                continue
            # Look again without blocking only when a backlog is likely: several came at once, or
            # they came while earlier ones were still being served. A lone command (one asker at a
            # time) goes straight back to the blocking read: an empty batch read costs ~1/4 of its CPU.
            busy = len(batch) > 1 or (bool(batch) and self._serving > 0)
            self._serving += len(batch)
            for raw in batch:
                if self._idle_servers:
                    idle = self._idle_servers.pop()  # each idle task gets one entry: none queues
                    idle.raw = raw
                    idle.done.set()
                else:
                    host.spawn(lambda raw=raw: self._serve_inbox_entries(raw))
            if batch:
                # Let those run up to their fenced write before the next inbox read goes out:
                # sending it (and reading its answer) first delays each forwarded command ~100 us.
                await anyio.lowlevel.checkpoint()

    async def _serve_inbox_entries(self, raw: bytes | None) -> None:
        """Serve `raw`, then stay for the entries handed over while idle (unless enough others
        already wait)."""
        while raw is not None:
            try:
                await self.serve_forwarded(raw)
            except Exception:
                # e.g. redis-py's "Too many connections" while activating a burst of hand-offs: an
                # error escaping here would cancel the host's task group (renewal, timers, inbox)
                log.exception("serving an inbox entry failed")
            finally:
                self._serving -= 1
                if self._serving < _MAX_SERVING:
                    self._room.set()
            if len(self._idle_servers) >= _MAX_IDLE_SERVERS:
                return
            idle = _IdleServer()
            self._idle_servers.append(idle)
            try:
                await idle.done.wait()
            finally:
                if idle in self._idle_servers:  # cancelled while idle (host stopping)
                    self._idle_servers.remove(idle)
            raw = idle.raw

    async def run_replies(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver answers published on our reply channel to the asks waiting for them."""
        pubsub = self.host.pubsub_redis.pubsub()
        await pubsub.subscribe(self.reply_channel)
        task_status.started()
        lost = False
        try:
            while True:
                try:
                    m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                except Exception as e:
                    log.warning("reply channel read failed: %r", e)
                    lost = True
                    await anyio.sleep(0.2)
                    continue
                if lost:
                    # Subscribed again (redis-py re-subscribes on reconnect), e.g. after a Redis
                    # failover; answers published meanwhile are gone: every waiting ask re-sends.
                    lost = False
                    for waiter in self._waiting.values():
                        waiter.done.set()
                if m is None or m.get("type") != "message":
                    continue
                msg = msgpack.unpackb(m["data"])
                waiter = self._waiting.get(msg["r"])
                if waiter is not None and waiter.msg is None:
                    waiter.msg = msg
                    waiter.done.set()
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()
