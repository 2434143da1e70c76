"""Per-instance fan-out: one Redis pub/sub connection relays session update messages to watchers.

A watcher is a callable taking the update-message bytes (`kairos.wire.update_message`). The first
watcher of a session subscribes its channel, the last one to leave unsubscribes it. Callbacks run
on the reader task and must not block (the web layer only enqueues frames).

Redis pub/sub is fire-and-forget: whatever is published while the connection is down is lost, and
redis-py resubscribes silently when it reconnects. So after every reconnect `on_gap` is called
with the sessions watched at that moment, once the channels are subscribed again: the watchers
must re-read those sessions (the web layer sends each socket a fresh STATE_SYNC).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
import redis.asyncio as aioredis
import structlog

from actors import metrics
from actors.keys import Keys

log = structlog.get_logger("kairos.fanout")

Watcher = Callable[[bytes], None]
GapHandler = Callable[[list[str]], Awaitable[None]]


class FanOut:
    """`async with FanOut(redis, key_prefix=...) as fanout:`; then `watch(session_id, fn)` / `unwatch`."""

    def __init__(self, redis: aioredis.Redis, *, key_prefix: str = "kairos:",
                 on_gap: GapHandler | None = None) -> None:
        self._redis = redis
        self._on_gap = on_gap
        self._keys = Keys(key_prefix)
        self._watchers: dict[str, set[Watcher]] = {}
        self._subscribed: set[str] = set()  # sessions whose SUBSCRIBE went out (and was recorded)
        self._by_channel: dict[bytes, str] = {}
        self._pubsub: aioredis.client.PubSub | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._lock = anyio.Lock()  # serialises (un)subscribe commands on the one connection
        self._ready = anyio.Event()

    async def __aenter__(self) -> FanOut:
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None and self._pubsub is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(et, e, tb)
        finally:
            await self._pubsub.aclose()

    def watching(self) -> int:
        """Number of sessions this instance is subscribed to."""
        return len(self._watchers)

    async def watch(self, session_id: str, watcher: Watcher) -> None:
        """Relay the session's update messages to `watcher`; returns once the session's channel
        is subscribed (the first call subscribes; a call while that is under way waits for it,
        and subscribes itself if it was cut short). After a failure, `unwatch` the watcher."""
        watchers = self._watchers.setdefault(session_id, set())
        watchers.add(watcher)
        if session_id in self._subscribed:
            return
        channel = self._keys.channel(session_id)
        self._by_channel[channel.encode()] = session_id
        async with self._lock:
            assert self._pubsub is not None
            # a fast unwatch may have raced us; another call may have subscribed meanwhile
            if session_id in self._watchers and session_id not in self._subscribed:
                await self._pubsub.subscribe(channel)
                self._subscribed.add(session_id)
                if not self._ready.is_set():
                    # redis-py calls this on every later reconnect of the pub/sub connection,
                    # after its own callback has resubscribed the channels.
                    assert self._pubsub.connection is not None
                    self._pubsub.connection.register_connect_callback(self._reconnected)
                    self._ready.set()

    async def unwatch(self, session_id: str, watcher: Watcher) -> None:
        """Stop relaying to `watcher`; unsubscribes after the last watcher of the session left."""
        watchers = self._watchers.get(session_id)
        if watchers is None:
            return
        watchers.discard(watcher)
        if watchers:
            return
        del self._watchers[session_id]
        channel = self._keys.channel(session_id)
        async with self._lock:
            assert self._pubsub is not None
            if session_id not in self._watchers:
                self._by_channel.pop(channel.encode(), None)
                self._subscribed.discard(session_id)
                await self._pubsub.unsubscribe(channel)

    def _reconnected(self, _connection: object) -> None:
        sessions = list(self._watchers)
        log.warning("fanout reconnected; watchers re-sync", sessions=len(sessions))
        metrics.FANOUT_RECONNECTS.inc()
        if self._on_gap is not None and sessions and self._tg is not None:
            self._tg.start_soon(self._fill_gap, sessions)

    async def _fill_gap(self, sessions: list[str]) -> None:
        assert self._on_gap is not None
        try:
            await self._on_gap(sessions)
        except Exception:  # a failed re-sync must not take the relay down with it
            log.exception("fanout re-sync failed", sessions=len(sessions))

    async def _drop_connection(self) -> None:
        assert self._pubsub is not None
        conn = self._pubsub.connection
        if conn is None:
            return
        try:
            await conn.disconnect()
        except Exception as exc:  # it is being dropped: nothing more to do with it
            log.warning("fanout disconnect failed", error=str(exc))

    async def _reader(self) -> None:
        assert self._pubsub is not None
        while True:
            # redis-py's PubSub refuses to read before the first subscription exists.
            await self._ready.wait()
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except (ConnectionError, OSError, aioredis.RedisError) as exc:
                log.warning("fanout connection lost; resubscribing", error=str(exc))
                await anyio.sleep(0.2)
                continue
            except Exception:
                # redis-py can fail otherwise when a connection is torn down under a read (e.g.
                # RuntimeError "the handler is closed"). Ending here would leave every socket of
                # this instance subscribed and silent: drop the connection instead, so the next
                # read reconnects, resubscribes and re-syncs the watchers.
                log.exception("fanout read failed; reconnecting")
                await self._drop_connection()
                await anyio.sleep(0.2)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            sid = self._by_channel.get(msg["channel"])
            for watcher in list(self._watchers.get(sid, ())) if sid else ():
                try:
                    watcher(msg["data"])
                except Exception:  # one bad watcher must not stop the relay for the others
                    log.exception("fanout watcher failed", session_id=sid)
