"""The Quart application: builds the services an instance needs and wires routes, WS and errors.

`create_app(settings)` returns the app; its `while_serving` lifespan opens Redis, the actor host,
the fan-out and (when available) the audit services in one `AsyncExitStack`, so stopping the
server stops them all, in reverse order.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as aioredis
import structlog
from quart import Quart, Response
from quart_schema import QuartSchema

from actors.clock import ClusterClock, local_ns, time_source
from actors.connection import open_pubsub, open_redis
from actors.fanout import FanOut
from actors.outbox.audit import AuditServices
from actors.supervise import supervised
from web import apidocs, gctune, hygiene, metrics
from web import cors as web_cors
from web import errors as web_errors
from web.auth import Authenticator
from web.cors import Cors
from web.limits import ClientAddress, GeneralLimiter
from web.openapi import API_DESCRIPTION, API_TAGS, API_VERSION, KairosOpenAPI
from web.settings import Settings

if TYPE_CHECKING:
    from actors.host import Host
    from web.ws import Relays

log = structlog.get_logger("kairos.app")


@dataclass
class Services:
    """Everything a request handler needs, owned by the app's lifespan (filled in at start)."""

    settings: Settings
    auth: Authenticator
    limiter: GeneralLimiter
    addresses: ClientAddress
    instance_id: str
    clock: ClusterClock = field(default_factory=ClusterClock)  # now_ms in the cluster's time base
    host: Host = None  # type: ignore[assignment]  # set by the lifespan before serving
    fanout: FanOut | None = None
    audit: AuditServices | None = None  # None only when no database is configured
    redis: aioredis.Redis | None = None
    relays: Relays | None = None
    cors: Cors = field(default_factory=lambda: Cors([]))
    draining: bool = False
    task_group: anyio.abc.TaskGroup | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Ends the process once a drain of the last instance is done (set by `kairos serve`).
    stop: Callable[[], None] | None = None

    async def drain_plan(self) -> tuple[list[str], str]:
        """Live non-draining other instances, and what a drain here will do, in words."""
        me = self.host.incarnation
        try:
            live = await self.host.instances()
        except Exception as e:  # Redis unreachable: nobody could take anything over anyway
            return [], f"instance list unreadable ({type(e).__name__}): exiting after the drain"
        others = [i["incarnation"] for i in live if not i.get("draining") and i["incarnation"] != me]
        if others:
            return others, (f"handing sessions off to {len(others)} other instance(s); this process "
                            "forwards what still reaches it until it is stopped")
        return others, "no other instance: exiting after checkpoint"

    async def drain(self) -> None:
        """Stop taking sessions, hand leases off, tell WebSocket clients to reconnect (1012).
        With no other instance to take the sessions, release them and end the process."""
        if self.draining:
            return
        self.draining = True
        started = time.monotonic()
        others: list[str] = []
        if self.host is not None:
            others, plan = await self.drain_plan()
            log.info("draining", plan=plan, actors=self.host.actor_count())
            with anyio.move_on_after(self.settings.drain_timeout_s):
                await self.host.drain()
        if self.relays is not None:
            await self.relays.close_all(1012, "Service restart")
        log.info("drained", ms=round((time.monotonic() - started) * 1000),
                 left=self.host.actor_count() if self.host is not None else 0)
        if not others and self.stop is not None:
            self.stop()


def create_app(settings: Settings) -> Quart:
    """The Kairos Quart app for these settings (the servers are opened when serving starts)."""
    from web.routes import register_routes
    from web.ws import Relays, register_ws

    instance_id = settings.instance_id or f"kairos-{uuid.uuid4().hex[:8]}"
    svc = Services(
        settings=settings,
        auth=Authenticator(settings),
        limiter=GeneralLimiter(settings.rate_limit_general, time.time),
        addresses=ClientAddress(settings.trusted_proxies),
        instance_id=instance_id,
        cors=Cors(settings.cors_origins),
        clock=_cluster_clock(settings.clock_max_error_ms, settings.test_clock_skew_ms),
    )
    svc.relays = Relays(svc)
    app = Quart("kairos")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["QUART_SCHEMA_CONVERT_CASING"] = False
    QuartSchema(
        app,
        openapi_provider_class=KairosOpenAPI,
        openapi_path="/api-docs.json",
        swagger_ui_path=None,  # web.apidocs serves /api-docs from the package (offline)
        redoc_ui_path=None,
        scalar_ui_path=None,
        info={"title": "Kairos", "version": API_VERSION, "description": API_DESCRIPTION},
        tags=API_TAGS,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        security=[{"bearer": []}],
    )
    _skip_schema_conversion_for_responses(app)
    app.extensions["kairos"] = svc
    web_errors.install(app)
    web_cors.install(app, svc.cors)
    hygiene.install(app)
    register_routes(app)
    app.register_blueprint(apidocs.bp)
    app.extensions["kairos.ws"] = register_ws(app, svc)  # served by web.hypercorn_ws

    @app.while_serving
    async def lifespan() -> Any:
        async with AsyncExitStack() as stack:
            await _open_services(svc, stack)
            # Long-lived objects created at start never need scanning by the cyclic GC again.
            gc.collect()
            gc.freeze()
            gctune.install()  # and what survives a costly full collection from now on
            log.info("serving", instance_id=svc.instance_id)
            yield
            started = time.monotonic()
            if svc.relays is not None:
                await svc.relays.close_all(1001, "Server shutting down")
        log.info("stopped background tasks", ms=round((time.monotonic() - started) * 1000))

    return app


def _cluster_clock(max_error_ms: float, skew_ms: int) -> ClusterClock:
    """The instance's clock in the cluster's time base; `skew_ms` fakes a wrong local clock (tests)."""
    if not skew_ms:
        return ClusterClock(max_error_ms=max_error_ms)
    skew_ns = skew_ms * 1_000_000
    return ClusterClock(local=lambda: local_ns() + skew_ns, max_error_ms=max_error_ms)


def _skip_schema_conversion_for_responses(app: Quart) -> None:
    """quart-schema converts every return value (pydantic dumps, header casing); our routes return
    finished `Response` objects, so pass those straight through (tens of us per request)."""
    converting = app.make_response

    async def make_response(rv: Any) -> Any:
        if isinstance(rv, Response):
            return rv
        return await converting(rv)

    app.make_response = make_response  # type: ignore[method-assign]


async def _open_services(svc: Services, stack: AsyncExitStack) -> None:
    s = svc.settings
    if not s.auth_enabled:
        log.warning("AUTHENTICATION IS DISABLED (KAIROS_AUTH=disabled): local development only")
    assert s.redis_url, "serve with a Redis URL (the CLI starts an embedded one)"
    svc.redis = open_redis(s.redis_url)
    stack.push_async_callback(svc.redis.aclose)
    tg = await stack.enter_async_context(anyio.create_task_group())
    svc.task_group = tg
    tg.start_soon(supervised, metrics.watch_loop_lag, "loop-lag watch")
    assert svc.relays is not None
    tg.start_soon(supervised, partial(svc.relays.heartbeat, s.ws_heartbeat_s), "WebSocket heartbeat")
    metrics.watch_gc()
    stack.callback(tg.cancel_scope.cancel)
    clock = svc.clock
    reference = time_source(svc.redis, s.key_prefix)  # on a cluster: one agreed node's TIME
    try:  # measured before the host starts, so it claims sessions from the start
        await clock.measure(reference)
    except Exception as e:
        log.warning("clock measurement failed", error=repr(e))
    tg.start_soon(supervised, partial(clock.run, reference), "clock")
    restore = None
    if s.database_url:
        svc.audit = await _open_audit(svc, stack)
        restore = svc.audit.restore
    from actors.host import Host

    # The host gets a connection pool of its own: it budgets its pool (script calls queue behind a
    # limiter, a few connections kept for its readers), and the audit workers and the fan-out
    # holding connections of a shared pool made a burst of drain hand-offs fail with redis-py's
    # "Too many connections".
    host_redis = open_redis(s.redis_url)
    stack.push_async_callback(host_redis.aclose)
    svc.host = await stack.enter_async_context(
        Host(
            host_redis,
            key_prefix=s.key_prefix,
            lease_ttl_ms=s.lease_ttl_ms,
            instance_id=svc.instance_id,
            restore=restore,
            switch_rate_per_s=s.rate_limit_switch,
            passivate_after_ms=s.passivate_after_ms,
            idempotency_window_ms=s.idempotency_window_s * 1000,
            clock=clock,
            clock_synced=clock.synced,
            min_replicas_ack=s.redis_min_replicas_ack,
            partitions=s.partitions,
        )
    )
    svc.limiter.shared = svc.host.scripts.do_count_request  # one limit for all instances
    metrics.track_actors(svc.host.actor_count)
    # Its own client: the pub/sub connection is named after the instance (CLIENT LIST shows whose
    # it is), and after a reconnect every watched session's sockets are re-synced.
    fanout_redis = open_pubsub(s.redis_url, client_name=f"kairos-fanout:{svc.instance_id}")
    stack.push_async_callback(fanout_redis.aclose)
    svc.fanout = await stack.enter_async_context(
        FanOut(fanout_redis, key_prefix=s.key_prefix, on_gap=svc.relays.resync))


async def _open_audit(svc: Services, stack: AsyncExitStack) -> AuditServices:
    """The audit and push workers plus the PostgreSQL-backed queries the routes need."""
    s = svc.settings
    audit = AuditServices(
        svc.redis,
        key_prefix=s.key_prefix,
        database_url=s.database_url,
        consumer=svc.instance_id,
        partitions=s.partitions,
        fcm_credentials=s.fcm_credentials,
        fcm_endpoint=s.fcm_endpoint,
        migrate=s.migrate_on_start,
    )
    return await stack.enter_async_context(audit)
