"""REST routes of docs/api.md: sessions, time, devices, admin, health, readiness and metrics.

One Blueprint of top-level handlers; each reaches the instance's `Services` through `services()`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from quart import Blueprint, Quart, Response, current_app, request
from quart_schema import document_querystring, document_request, document_response, tag

import kairos
from actors.clock import ClusterClock
from kairos import commands as C
from kairos import wire
from kairos.errors import SessionNotFound
from web import auth as A
from web import errors as W
from web import metrics
from web import schemas as S
from web.openapi import API_VERSION, documented

if TYPE_CHECKING:
    from web.app import Services

log = structlog.get_logger("kairos.http")

IMPLEMENTATION = f"kairos-{kairos.__version__}"
M = TypeVar("M", bound=BaseModel)

_UUID = re.compile(S.UUID_PATTERN)
_JSON = "application/json"
_NO_SWITCH_ARGS = S.SwitchBody()  # the common bodiless switch skips validation
_NO_ACCESS_LOG = frozenset({"/health", "/ready", "/metrics"})
_LIFECYCLE_ERRORS = (400, 401, 403, 404, 413, 429, 503)
_ACCESS_LOG = "KAIROS_ACCESS_LOG"  # app.config flag: log every request (INFO or DEBUG level)

bp = Blueprint("kairos", __name__)


def services() -> Services:
    """The serving app's `Services` (set by `web.app.create_app`)."""
    return current_app.extensions["kairos"]  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise once with the stdlib encoder (compact separators) into a Response."""
    return Response(json.dumps(body, separators=(",", ":")), status=status, headers=headers,
                    content_type=_JSON)


def session_id_param(raw: str) -> str:
    """Validate the `{session_id}` path segment before any lookup; returns it in lower case."""
    if not _UUID.match(raw):
        raise W.validation_error(
            [{"field": "session_id", "message": "must be a UUID", "code": "invalid_uuid"}])
    return raw.lower()


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and (len(key) > 128 or not key):
        raise W.validation_error(
            [{"field": "Idempotency-Key", "message": "must be 1-128 characters", "code": "too_big"}]
        )
    return key


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes) -> Any:
    """Strict JSON (no NaN/Infinity); raises ValueError on anything malformed, however deep."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None


def validated(model: type[M], raw: Any) -> M:
    """`raw` parsed into `model`, or a VALIDATION_ERROR with dotted-path details (also for what no
    store can keep anywhere in `raw`: U+0000, lone surrogates, integers beyond 64 bits)."""
    problems = S.unstorable(raw)
    if problems:
        raise W.validation_error(problems)
    try:
        return model.model_validate(raw)
    except PydanticValidationError as exc:
        raise W.from_pydantic(exc) from None


async def optional_body() -> dict[str, Any]:
    """Action routes: a missing or non-JSON body counts as `{}`."""
    data = await request.get_data(cache=False)
    if not data:
        return {}
    try:
        body = parse_json(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def required_body() -> Any:
    data = await request.get_data(cache=False)
    try:
        return parse_json(data)
    except ValueError:
        raise W.validation_error(
            [{"field": "body", "message": "malformed JSON", "code": "invalid_json"}]
        ) from None


def register_routes(app: Quart) -> None:
    """Attach every REST route (the blueprint) to `app`."""
    app.register_blueprint(bp)


@bp.record_once
def _configure(state: Any) -> None:
    level = logging.getLevelName(state.app.extensions["kairos"].settings.log_level.upper())
    state.app.config[_ACCESS_LOG] = level in (logging.DEBUG, logging.INFO)


async def authenticate() -> A.Caller:
    """The request's caller (raises Unauthorized); counts the request against its general limit."""
    svc = services()
    caller, quota = await A.counted_caller(svc.auth, svc.limiter, client_address,
                                     request.headers.get("Authorization"))
    structlog.contextvars.bind_contextvars(sub=caller.sub)  # on every later line (access log too)
    if quota is not None:
        # after_request adds the RateLimit-* headers to whatever the route answers.
        request._kairos_quota = quota  # type: ignore[attr-defined]
    return caller


def client_address() -> str:
    """The client's address (X-Forwarded-For honoured only from trusted proxies)."""
    return services().addresses.resolve(request.remote_addr, request.headers.get("X-Forwarded-For"))


async def ask(sid: str, command: Any, name: str) -> Any:
    """Run `command` on the session's actor, timing it for the command metrics."""
    host = services().host
    start = time.perf_counter()
    reply = None
    try:
        reply = await host.ask(sid, command)
        return reply
    finally:
        metrics.observe_command(host, sid, name, time.perf_counter() - start, reply)


async def load(sid: str) -> Any:
    """The session's current state (raises SessionNotFound)."""
    return await services().host.get(sid)


# ---------------- health, readiness, metrics, time ----------------


@bp.get("/health")
@tag(["ops"])
@documented(open_route=True)
@document_response(S.StatusOut)
async def health() -> Response:
    """Alive."""
    return Response('{"status":"ok"}', content_type=_JSON)


@bp.get("/ready")
@tag(["ops"])
@documented(open_route=True)
@document_response(S.StatusOut, 200)
@document_response(S.StatusOut, 503)
async def ready() -> Response:
    """Ready to serve: Redis (and PostgreSQL) reachable and not draining."""
    svc = services()
    try:
        if svc.draining or (svc.host is not None and getattr(svc.host, "draining", False)):
            raise RuntimeError("instance draining")
        if svc.redis is None:
            raise RuntimeError("starting")
        if isinstance(svc.clock, ClusterClock) and not svc.clock.synced():
            raise RuntimeError(f"clock not synced to the cluster (error {svc.clock.error_ms():.0f} ms)")
        await svc.redis.ping()
        if svc.audit is not None:
            await svc.audit.ping()
    except Exception as exc:  # any failure means "not ready", with the reason
        return json_response({"status": "not_ready", "error": str(exc) or type(exc).__name__}, 503)
    return json_response({"status": "ready"})


@bp.get("/metrics")
@tag(["ops"])
@documented(open_route=True, success=(200, "Prometheus text exposition format 0.0.4."))
async def metrics_route() -> Response:
    """Prometheus text exposition."""
    body, ctype = metrics.exposition()
    return Response(body, content_type=ctype)


@bp.get("/v1/time")
@tag(["time"])
@document_response(S.TimeOut)
@documented(429, open_route=True)
async def server_time() -> Response:
    """Server clock for sync: four-timestamp fields `server_receive_ms`/`server_send_ms`."""
    svc = services()
    clock = svc.clock
    received = clock()
    quota = await svc.limiter.hit(client_address())
    if quota is not None:
        request._kairos_quota = quota  # type: ignore[attr-defined]
    now = clock()
    return json_response(
        {"timestamp_ms": now, "server_version": API_VERSION, "implementation": IMPLEMENTATION,
         "drift_tolerance_ms": 50, "server_receive_ms": received, "server_send_ms": clock()},
    )


# ---------------- sessions ----------------


@bp.post("/v1/sessions")
@tag(["sessions"])
@document_request(S.CreateSession)
@document_response(S.SessionEnvelope, 201)
@documented(400, 401, 409, 413, 429, 503, idempotent=True)
async def create_session() -> Response:
    """Create a session; the caller (`sub`) becomes its owner."""
    caller = await authenticate()
    key = idempotency_key()
    raw = await required_body()
    body = validated(S.CreateSession, raw)
    problems = body.cross_field_errors()
    if problems:
        raise W.validation_error(problems)
    cmd = C.Create(
        session_id=body.session_id,
        sync_mode=body.sync_mode,
        participants=tuple(
            C.ParticipantSpec(p.participant_id, p.total_time_ms, p.participant_index, p.group_id)
            for p in body.participants
        ),
        owner=caller.sub,
        total_time_ms=body.total_time_ms,
        time_per_cycle_ms=body.time_per_cycle_ms,
        increment_ms=body.increment_ms,
        max_time_ms=body.max_time_ms,
        expiry_policy=body.expiry_policy,
        time_warning_ms=body.time_warning_ms,
        visibility=body.visibility,
        metadata=body.metadata,
        command_id=key,
    )
    reply = await ask(body.session_id, cmd, "create")
    return json_response({"data": wire.session_json(reply.state, reply.now_ms)}, 201)


@bp.get("/v1/sessions/<session_id>")
@tag(["sessions"])
@document_response(S.SessionEnvelope)
@documented(400, 401, 403, 404, 429, 503)
async def get_session(session_id: str) -> Response:
    """The session with live times as of `server_time_ms`."""
    caller = await authenticate()
    sid = session_id_param(session_id)
    state = await load(sid)
    A.require_read(caller, state)
    return json_response({"data": wire.session_json(state, services().clock())})


async def lifecycle(session_id: str, name: str, make: Callable[[str | None], Any]) -> Response:
    """A bodiless lifecycle command (start/pause/...) by the owner or an admin."""
    caller = await authenticate()
    sid = session_id_param(session_id)
    key = idempotency_key()
    await optional_body()  # read and ignored: these commands take no arguments
    cmd = make(key)
    if not caller.is_admin:
        A.require_manage(caller, await load(sid))
    reply = await ask(sid, cmd, name)
    return json_response({"data": wire.session_json(reply.state, reply.now_ms)})


@bp.post("/v1/sessions/<session_id>/start")
@tag(["sessions"])
@document_response(S.SessionEnvelope)
@documented(*_LIFECYCLE_ERRORS, idempotent=True)
async def start_session(session_id: str) -> Response:
    """Start the session (owner or admin)."""
    return await lifecycle(session_id, "start", lambda k: C.Start(command_id=k))


@bp.post("/v1/sessions/<session_id>/pause")
@tag(["sessions"])
@document_response(S.SessionEnvelope)
@documented(*_LIFECYCLE_ERRORS, idempotent=True)
async def pause_session(session_id: str) -> Response:
    """Pause the session (owner or admin)."""
    return await lifecycle(session_id, "pause", lambda k: C.Pause(command_id=k))


@bp.post("/v1/sessions/<session_id>/resume")
@tag(["sessions"])
@document_response(S.SessionEnvelope)
@documented(*_LIFECYCLE_ERRORS, idempotent=True)
async def resume_session(session_id: str) -> Response:
    """Resume the session (owner or admin)."""
    return await lifecycle(session_id, "resume", lambda k: C.Resume(command_id=k))


@bp.post("/v1/sessions/<session_id>/complete")
@tag(["sessions"])
@document_response(S.SessionEnvelope)
@documented(*_LIFECYCLE_ERRORS, idempotent=True)
async def complete_session(session_id: str) -> Response:
    """Complete the session (owner or admin)."""
    return await lifecycle(session_id, "complete", lambda k: C.Complete(command_id=k))


@bp.post("/v1/sessions/<session_id>/cancel")
@tag(["sessions"])
@document_response(S.SessionEnvelope)
@documented(*_LIFECYCLE_ERRORS, idempotent=True)
async def cancel_session(session_id: str) -> Response:
    """Cancel the session (owner or admin): from pending, running or paused."""
    return await lifecycle(session_id, "cancel", lambda k: C.Cancel(command_id=k))


@bp.post("/v1/sessions/<session_id>/switch")
@tag(["sessions"])
@document_request(S.SwitchBody)
@document_response(S.SwitchEnvelope)
@documented(*_LIFECYCLE_ERRORS, 409, idempotent=True)
async def switch_session(session_id: str) -> Response:
    """End the active turn; owner, admin or the active participant. Body optional."""
    caller = await authenticate()
    sid = session_id_param(session_id)
    key = idempotency_key()
    raw = await optional_body()
    body = validated(S.SwitchBody, raw) if raw else _NO_SWITCH_ARGS
    expected = body.expected_active_participant_id
    if not caller.is_admin:
        expected = A.switch_guard(caller, await load(sid), expected)
    reply = await ask(
        sid, C.Switch(body.next_participant_id, expected, command_id=key), "switch"
    )
    data = wire.switch_result_json(
        reply.state, reply.now_ms, reply.outcome.get("expired_participant_id")
    )
    return json_response({"data": data})


@bp.delete("/v1/sessions/<session_id>")
@tag(["sessions"])
@documented(400, 401, 403, 429, 503, idempotent=True,
            success=(204, "Deleted (also when no such session existed)."))
async def delete_session(session_id: str) -> Response:
    """Delete (204, also for an unknown id: idempotent). Owner or admin."""
    caller = await authenticate()
    sid = session_id_param(session_id)
    key = idempotency_key()
    try:
        if not caller.is_admin:
            A.require_manage(caller, await load(sid))
        await ask(sid, C.Delete(command_id=key), "delete")
    except SessionNotFound:
        pass
    return Response(b"", status=204)


@bp.get("/v1/sessions/<session_id>/events")
@tag(["sessions"])
@document_querystring(S.EventsQuery)
@document_response(S.EventsEnvelope)
@documented(400, 401, 403, 404, 429, 503)
async def session_events(session_id: str) -> Response:
    """Audit history, oldest first; page with `?after_version=`."""
    caller = await authenticate()
    sid = session_id_param(session_id)
    q = validated(S.EventsQuery, dict(request.args))
    state = await load(sid)
    A.require_read(caller, state)
    audit = services().audit
    events = [] if audit is None else await audit.events(sid, q.after_version, q.limit)
    return json_response({"data": events})


# ---------------- devices ----------------


@bp.post("/v1/devices")
@tag(["devices"])
@document_request(S.DeviceIn)
@document_response(S.DeviceEnvelope, 201)
@documented(400, 401, 403, 409, 413, 429, 503)
async def register_device() -> Response:
    """Register a push token for the caller (409 if another caller holds it).

    A token belongs to whoever registered it until they delete it or FCM reports it unregistered;
    another caller gets 409 DEVICE_TOKEN_TAKEN. An admin may reassign it with `sub`."""
    caller = await authenticate()
    raw = await required_body()
    body = validated(S.DeviceIn, raw)
    owner = body.sub or caller.sub
    if owner != caller.sub:
        A.require_admin(caller)
    audit = services().audit
    if audit is not None:
        await audit.register_device(owner, body.token, body.platform, take_over=caller.is_admin)
    return json_response({"data": {"token": body.token, "platform": body.platform}}, 201)


@bp.delete("/v1/devices/<path:token>")
@tag(["devices"])
@documented(400, 401, 429, 503, success=(204, "Forgotten (also when the token was unknown)."))
async def delete_device(token: str) -> Response:
    """Forget a push token of the caller, or anyone's for an admin (204 even if unknown)."""
    caller = await authenticate()
    problems = S.unstorable(token, "token")
    if problems:
        raise W.validation_error(problems)
    audit = services().audit
    if audit is not None:
        await audit.delete_device(None if caller.is_admin else caller.sub, token)
    return Response(b"", status=204)


# ---------------- admin ----------------


@bp.post("/admin/drain")
@tag(["admin"])
@document_response(S.DrainEnvelope, 202)
@documented(401, 403, 429)
async def admin_drain() -> Response:
    """Drain this instance (admin): hand off leases, close sockets with 1012; `plan` says what
    happens next (a lone instance releases its sessions and exits)."""
    caller = await authenticate()
    A.require_admin(caller)
    svc = services()
    assert svc.task_group is not None
    _, plan = await svc.drain_plan()
    svc.task_group.start_soon(svc.drain)
    return json_response({"data": {"status": "draining", "instance_id": svc.instance_id, "plan": plan}}, 202)


@bp.get("/admin/instances")
@tag(["admin"])
@document_response(S.InstancesEnvelope)
@documented(401, 403, 429, 503)
async def admin_instances() -> Response:
    """Live instances with actor counts and draining flags (admin)."""
    caller = await authenticate()
    A.require_admin(caller)
    return json_response({"data": await services().host.instances()})


@bp.get("/admin/sessions/<session_id>/owner")
@tag(["admin"])
@document_response(S.OwnerEnvelope)
@documented(400, 401, 403, 429, 503)
async def admin_session_owner(session_id: str) -> Response:
    """Who holds the session's lease (admin).

    `instance_id`, `incarnation`, `epoch`, `alive`; all null (`alive` false) while nobody does
    (never activated, passivated, or released)."""
    caller = await authenticate()
    A.require_admin(caller)
    sid = session_id_param(session_id)
    owner = await services().host.owner(sid) or {
        "incarnation": None, "epoch": None, "alive": False, "instance_id": None}
    return json_response({"data": {"session_id": sid, **owner}})


# ---------------- access log, ids, request metrics ----------------


@bp.before_app_request
async def bind_ids() -> None:
    """Bind request (and session) ids to the log context; note the start time."""
    req = request._get_current_object()  # one proxy lookup instead of one per attribute
    structlog.contextvars.clear_contextvars()
    rid = (req.headers.get("X-Request-Id") or f"{time.monotonic_ns():x}")[:64]
    req._kairos_rid = rid  # type: ignore[attr-defined]  # echoed in the response
    sid = (req.view_args or {}).get("session_id")
    if sid is not None:
        structlog.contextvars.bind_contextvars(request_id=rid, session_id=sid[:64])
    else:
        structlog.contextvars.bind_contextvars(request_id=rid)
    req._kairos_t0 = time.perf_counter()  # type: ignore[attr-defined]


@bp.after_app_request
async def access_log(response: Response) -> Response:
    """Count the request, add the RateLimit-* headers, log it (not health/ready/metrics)."""
    req = request._get_current_object()
    rule = req.url_rule.rule if req.url_rule is not None else "unmatched"
    metrics.HTTP_REQUESTS.labels(req.method, rule, response.status_code).inc()
    quota = getattr(req, "_kairos_quota", None)
    if quota is not None:
        response.headers.update(quota.headers())
    rid = getattr(req, "_kairos_rid", None)
    if rid is not None:
        response.headers["X-Request-Id"] = rid
    if current_app.config[_ACCESS_LOG] and req.path not in _NO_ACCESS_LOG:
        t0 = getattr(req, "_kairos_t0", None)
        # A push token in the path is a credential: log the route template instead.
        path = rule if "token" in (req.view_args or {}) else req.path
        log.info("request", method=req.method, path=path, status=response.status_code,
                 ms=round((time.perf_counter() - t0) * 1000, 3) if t0 else None,
                 client=client_address(), user_agent=req.headers.get("User-Agent"))
    return response
