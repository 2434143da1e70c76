"""Push notifications: consumer group `push` on the outbox turns events into FCM messages for the
participants' registered devices (a device's owner `sub` is a participant id), through the real
firebase-admin messaging API (`send_each`, batched), with one collapse key per session.

Tokens FCM reports unregistered (or invalid) are deleted; transient FCM errors are retried with
backoff; the hot path never waits for any of this. firebase-admin is blocking, so every call into
it runs in a worker thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import firebase_admin
import redis.asyncio as aioredis
from firebase_admin import credentials, exceptions, messaging
from prometheus_client import Counter, Gauge

from actors.connection import redis_failed
from actors.keys import PUSH_GROUP, Keys
from actors.outbox.consumer import (
    Backoff,
    Entry,
    combined_lag,
    consume,
    consumers,
    keep_entries,
)
from kairos import events as ev

log = logging.getLogger(__name__)

PUSH_RESULTS = Counter("kairos_push_results_total", "Push messages by outcome", ["result"])
PUSH_LAG = Gauge("kairos_push_lag_seconds", "Age of the oldest outbox entry not yet pushed")
PUSH_PENDING = Gauge("kairos_push_pending", "Outbox entries read by push but not yet acknowledged")

# send_each accepts up to 500 messages but runs one thread per message: keep batches modest
_FCM_BATCH = 100
_SEND_PATH = "/v1/projects/{}/messages:send"

# Errors worth another try later; everything else is final for that message.
_TRANSIENT = (
    exceptions.UnavailableError,
    exceptions.InternalError,
    exceptions.DeadlineExceededError,
    exceptions.ResourceExhaustedError,  # includes QuotaExceededError
    exceptions.UnknownError,
    exceptions.AbortedError,
)


class Devices:
    """The `devices` table: push tokens by owner `sub` (matched case-insensitively to
    participant ids, which are UUIDs in any case)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def register(self, sub: str, token: str, platform: str, *, take_over: bool = False) -> bool:
        """Add a token for `sub` (or update its platform); False when another `sub` holds it.
        `take_over` moves it to `sub` regardless (an admin reassigning a token)."""
        row = await self.pool.fetchval(
            """INSERT INTO devices (token, sub, platform) VALUES ($1, $2, $3)
               ON CONFLICT (token) DO UPDATE SET sub = EXCLUDED.sub, platform = EXCLUDED.platform
               WHERE $4 OR devices.sub = EXCLUDED.sub
               RETURNING 1""",
            token, sub, platform, take_over,
        )
        return row is not None

    async def delete(self, sub: str | None, token: str) -> None:
        """Remove `sub`'s token (anyone's when `sub` is None); someone else's is left alone."""
        await self.pool.execute(
            "DELETE FROM devices WHERE token = $1 AND ($2::text IS NULL OR sub = $2)", token, sub)

    async def tokens_for(self, subs: set[str]) -> dict[str, list[str]]:
        """Tokens per (lower-cased) owner."""
        rows = await self.pool.fetch(
            "SELECT lower(sub) AS sub, token FROM devices WHERE lower(sub) = ANY($1::text[])",
            sorted(s.lower() for s in subs),
        )
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r["sub"], []).append(r["token"])
        return out

    async def forget(self, tokens: list[str]) -> None:
        """Drop tokens FCM no longer accepts."""
        if tokens:
            await self.pool.execute("DELETE FROM devices WHERE token = ANY($1::text[])", tokens)

    async def touch(self, tokens: list[str]) -> None:
        """Record that these tokens just received a message."""
        if tokens:
            await self.pool.execute(
                "UPDATE devices SET last_used_at = now() WHERE token = ANY($1::text[])", tokens
            )


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification for one participant (before it is fanned out to their devices)."""

    participant_id: str
    session_id: str
    event_type: str
    version: int
    title: str
    body: str


def _clock(ms: Any) -> str:
    seconds = max(0, int(ms or 0)) // 1000
    return f"{seconds // 60}:{seconds % 60:02d}"


def notices_for(message: dict[str, Any]) -> list[Notice]:
    """The notifications one update message calls for: your turn, time low, time expired,
    paused/resumed/completed (to every participant)."""
    state = message.get("state") or {}
    everyone = [str(p["participant_id"]) for p in state.get("participants") or ()]
    session_id = str(message["session_id"])
    out: list[Notice] = []
    for event in message.get("events") or ():
        kind = event.get("type")
        who = event.get("participant_id")
        data = event.get("data") or {}
        version = int(event.get("version", message.get("version", 0)))

        def to(targets: list[str], title: str, body: str, kind: str = kind, version: int = version) -> None:
            out.extend(Notice(t, session_id, kind, version, title, body) for t in targets)

        if kind == ev.CYCLE_SWITCHED and who:
            left = data.get("time_remaining_ms")
            to([who], "Your turn", "It's your turn" + (f" ({_clock(left)} left)" if left is not None else ""))
        elif kind == ev.TIME_WARNING and who:
            left = data.get("time_remaining_ms", data.get("remaining_ms"))
            to([who], "Time running low", f"{_clock(left)} left on your clock")
        elif kind == ev.PARTICIPANT_EXPIRED and who:
            # a shared (per_group) bank runs out for the whole team at once
            to(list(data.get("expired_participant_ids") or [who]), "Time's up", "Your time ran out")
        elif kind == ev.SESSION_EXPIRED:
            to(everyone, "Session over", "Time ran out")
        elif kind == ev.SESSION_PAUSED:
            to(everyone, "Paused", "The session is paused")
        elif kind == ev.SESSION_RESUMED:
            to(everyone, "Resumed", "The session is running again")
        elif kind == ev.SESSION_COMPLETED:
            to(everyone, "Session completed", "The session has ended")
    return out


def fcm_message(notice: Notice, token: str) -> messaging.Message:
    """The FCM message for one notice on one device; the session id is the collapse key, so a
    phone shows only the latest notification of a session."""
    sid = notice.session_id
    return messaging.Message(
        token=token,
        notification=messaging.Notification(title=notice.title, body=notice.body),
        data={"session_id": sid, "event": notice.event_type, "version": str(notice.version),
              "participant_id": notice.participant_id},
        android=messaging.AndroidConfig(collapse_key=sid, priority="high"),
        apns=messaging.APNSConfig(headers={"apns-collapse-id": sid}),
        webpush=messaging.WebpushConfig(headers={"Topic": sid.replace("-", "")[:32]}),
    )


def _token_is_dead(error: Exception | None) -> bool:
    if isinstance(error, (messaging.UnregisteredError, messaging.SenderIdMismatchError)):
        return True
    # INVALID_ARGUMENT is also what a bad payload gets: only a bad token condemns the token.
    return isinstance(error, exceptions.InvalidArgumentError) and "registration token" in str(error)


class FcmClient:
    """A firebase-admin app of our own, optionally pointed at another FCM base URL."""

    def __init__(self, credentials_file: str, endpoint: str | None, name: str) -> None:
        self.credentials_file = credentials_file
        self.endpoint = endpoint
        self.name = name
        self.app: firebase_admin.App | None = None

    def _service(self) -> Any:
        # firebase-admin keeps one messaging service per app; private, but the only way in.
        return messaging._get_messaging_service(self.app)

    async def open(self) -> None:
        """Create the app (and its messaging service, with the endpoint override if any)."""

        def _open() -> None:
            cred = credentials.Certificate(self.credentials_file)
            self.app = firebase_admin.initialize_app(cred, {"httpTimeout": 10}, name=self.name)
            service = self._service()
            if self.endpoint:
                # No setting exists for the FCM base URL: the send URL is fixed when the service
                # is created, so replace it on our app's service before anything is sent.
                service._fcm_url = self.endpoint.rstrip("/") + _SEND_PATH.format(service._project_id)

        await anyio.to_thread.run_sync(_open)

    async def send_each(self, batch: list[messaging.Message]) -> list[Exception | None]:
        """Send up to 500 messages; one result per message (None = delivered)."""
        try:
            response = await anyio.to_thread.run_sync(messaging.send_each, batch, False, self.app)
        except Exception as e:  # e.g. OAuth token endpoint unreachable: the whole batch failed
            return [e] * len(batch)
        return [None if r.success else r.exception for r in response.responses]

    async def aclose(self) -> None:
        """Delete the app. delete_app() closes the async HTTP client with asyncio.run(), which
        cannot run inside our loop: close that client here first, then delete in a thread."""
        if self.app is None:
            return
        app, self.app = self.app, None
        service = messaging._get_messaging_service(app)
        await service._async_client.aclose()
        await anyio.to_thread.run_sync(service._client.close)
        await anyio.to_thread.run_sync(firebase_admin.delete_app, app)


class PushWorker:
    """Consumer `consumer` of group `push` (see module docstring). `async with` opens the FCM
    client; `run()` consumes until cancelled."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        devices: Devices,
        consumer: str,
        *,
        credentials: str,
        endpoint: str | None = None,
        batch_size: int = 200,
        claim_idle_ms: int = 30_000,
        max_attempts: int = 5,
        backoff_cap_s: float = 8.0,
        housekeeping_s: float = 1.0,
    ) -> None:
        # One consumer per outbox partition, read concurrently; `outbox` is partition 0's.
        self.outboxes = consumers(redis, keys, PUSH_GROUP, consumer, start_id="$", batch_size=batch_size,
                                  claim_idle_ms=claim_idle_ms)
        self.outbox = self.outboxes[0]
        self.devices = devices
        self.fcm = FcmClient(credentials, endpoint, name=f"kairos-push-{consumer}-{id(self):x}")
        self.max_attempts = max_attempts
        self.backoff_cap_s = backoff_cap_s
        self.housekeeping_s = housekeeping_s
        self._next_housekeeping = 0.0
        self._next_gc = 0.0
        self.results: dict[str, int] = {}  # outcome -> count, for tests and logs

    async def __aenter__(self) -> PushWorker:
        await self.fcm.open()
        try:
            for outbox in self.outboxes:
                await outbox.ensure_group()  # from now on every change is pushed
        except Exception as e:
            if not redis_failed(e):
                raise
            log.warning("push: cannot create consumer group yet: %s", e)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.fcm.aclose()

    def _count(self, result: str, n: int = 1) -> None:
        if n:
            PUSH_RESULTS.labels(result).inc(n)
            self.results[result] = self.results.get(result, 0) + n

    async def run(self) -> None:
        """Consume forever (until cancelled); outages of Redis, PostgreSQL or FCM only delay.
        One reader per outbox partition; batches are handled one at a time."""
        await consume(self.outboxes, self.backoff_cap_s, self._handle, self._housekeeping, read_ahead=0)

    async def _handle(self, batch: list[Entry]) -> None:
        notices = [n for e in batch if e.message is not None for n in _safe_notices(e)]
        if not notices:
            return
        tokens = await self._tokens({n.participant_id for n in notices}, batch)
        # A phone shows only a session's latest notification (collapse key), and send_each gives
        # no ordering: so per device and session, only the batch's latest notice is sent.
        latest: dict[tuple[str, str], Notice] = {}
        for n in notices:
            for token in tokens.get(n.participant_id.lower(), ()):
                latest.pop((token, n.session_id), None)  # re-insert: dict order = stream order
                latest[(token, n.session_id)] = n
        fanned = sum(len(tokens.get(n.participant_id.lower(), ())) for n in notices)
        self._count("superseded", fanned - len(latest))
        work = [(token, fcm_message(n, token)) for (token, _), n in latest.items()]
        if work:
            await self._send(work, batch)

    async def _tokens(self, subs: set[str], entries: list[Entry]) -> dict[str, list[str]]:
        backoff = Backoff(cap_s=self.backoff_cap_s)
        while True:
            try:
                return await self.devices.tokens_for(subs)
            except Exception as e:
                if backoff.attempt == 0:
                    log.warning("push: device lookup failed, retrying: %r", e)
                await keep_entries(self.outboxes, entries)
                await backoff.wait()

    async def _send(self, work: list[tuple[str, messaging.Message]], entries: list[Entry]) -> None:
        backoff = Backoff(first_s=0.5, cap_s=self.backoff_cap_s)
        for attempt in itertools.count(1):
            retry: list[tuple[str, messaging.Message]] = []
            dead: list[str] = []
            delivered: list[str] = []
            for start in range(0, len(work), _FCM_BATCH):
                chunk = work[start:start + _FCM_BATCH]
                results = await self.fcm.send_each([m for _, m in chunk])
                for (token, message), error in zip(chunk, results, strict=True):
                    if error is None:
                        delivered.append(token)
                    elif _token_is_dead(error):
                        dead.append(token)
                    elif isinstance(error, _TRANSIENT) or not isinstance(error, exceptions.FirebaseError):
                        retry.append((token, message))
                    else:
                        self._count("failed")
                        log.warning("push: message to a device rejected: %r", error)
            self._count("sent", len(delivered))
            self._count("unregistered", len(dead))
            await self._bookkeep(dead, delivered)
            if not retry:
                return
            if attempt >= self.max_attempts:
                self._count("failed", len(retry))
                log.warning("push: %d messages failed after %d attempts", len(retry), attempt)
                return
            self._count("retried", len(retry))
            work = retry
            await keep_entries(self.outboxes, entries)
            await backoff.wait()

    async def _bookkeep(self, dead: list[str], delivered: list[str]) -> None:
        try:
            await self.devices.forget(sorted(set(dead)))
            await self.devices.touch(sorted(set(delivered)))
        except Exception as e:  # only bookkeeping: a dead token is found dead again next time
            log.warning("push: device bookkeeping failed: %r", e)

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.housekeeping_s
        try:
            lag = await combined_lag(self.outboxes)
            if now >= self._next_gc:
                self._next_gc = now + 360.0
                for outbox in self.outboxes:
                    await outbox.forget_idle_consumers(3_600_000)  # earlier incarnations
        except Exception as e:
            if not redis_failed(e):
                raise
            return
        PUSH_PENDING.set(lag.pending)
        PUSH_LAG.set(lag.oldest_age_ms / 1000)


def _safe_notices(entry: Entry) -> list[Notice]:
    try:
        return notices_for(entry.message or {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.error("push: outbox entry %s is malformed (%r); skipped", entry.id, e)
        return []
