"""The one place that turns errors into wire bodies: REST error responses and WebSocket ERROR frames.

Domain and runtime code raise `kairos.errors.*`; HTTP-level problems (404 route, 405, 413, bad
JSON) and pydantic validation failures are mapped onto the same `{"error": {...}}` envelope.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from pydantic import ValidationError as PydanticValidationError
from quart import Quart, Response
from quart_schema import RequestSchemaValidationError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from kairos import errors as E

log = structlog.get_logger("kairos.errors")

_STATUS_CODES = {
    400: ("VALIDATION_ERROR", "Request validation failed"),
    404: ("NOT_FOUND", "Not found"),
    405: ("METHOD_NOT_ALLOWED", "Method not allowed"),
    413: ("PAYLOAD_TOO_LARGE", "Request body too large"),
    431: ("REQUEST_HEADER_FIELDS_TOO_LARGE", "Request headers too large"),
}


def error_body(err: E.KairosError) -> dict[str, Any]:
    """`{"error": {code, message, details?, retry_after_seconds?}}` for a Kairos error."""
    inner: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.details is not None:
        inner["details"] = err.details
    retry = getattr(err, "retry_after", None)
    if retry is not None:
        inner["retry_after_seconds"] = retry
    return {"error": inner}


def error_response(err: E.KairosError, headers: dict[str, str] | None = None) -> Response:
    """A JSON error response; 429/503 carry `Retry-After`."""
    hdrs = dict(headers or {})
    retry = getattr(err, "retry_after", None)
    if retry is not None:
        hdrs["Retry-After"] = str(retry)
    return Response(
        json.dumps(error_body(err)), status=err.status, headers=hdrs,
        content_type="application/json",
    )


def ws_error_frame(err: E.KairosError, request_id: str | None = None) -> str:
    """A WebSocket `ERROR` frame (`request_id` when it answers a command)."""
    frame: dict[str, Any] = {"type": "ERROR", "code": err.code, "message": err.message}
    if err.details is not None:
        frame["details"] = err.details
    retry = getattr(err, "retry_after", None)
    if retry is not None:
        frame["retry_after_seconds"] = retry
    if request_id is not None:
        frame["request_id"] = request_id
    return json.dumps(frame)


def from_http_exception(exc: HTTPException) -> E.KairosError:
    """Map a werkzeug/Quart HTTP error (unknown route, wrong method, body too large...)."""
    return status_error(exc.code or 500, exc.name)


def status_error(status: int, name: str | None = None) -> E.KairosError:
    """The error for a bare HTTP status (from werkzeug, or from Hypercorn's protocol layer)."""
    code, message = _STATUS_CODES.get(status, ("HTTP_ERROR", name or "HTTP error"))
    err = E.KairosError(message)
    err.code, err.status = code, status
    return err


def validation_error(details: list[dict[str, str]]) -> E.ValidationError:
    """A VALIDATION_ERROR (docs/api.md) with a details list of {field, message, code}."""
    return E.ValidationError("Request validation failed", details=details)


def from_pydantic(exc: PydanticValidationError, prefix: str = "") -> E.ValidationError:
    """Pydantic errors -> details with dotted paths (`participants.0.total_time_ms`)."""
    details = []
    for e in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__")
        field = ".".join(p for p in (prefix, loc) if p)
        message, code = _describe(e)
        details.append({"field": field or "body", "message": message, "code": code})
    return validation_error(details)


def _describe(e: dict[str, Any]) -> tuple[str, str]:
    """A short human message and a stable machine code for one pydantic error."""
    kind = e.get("type", "")
    ctx = e.get("ctx") or {}
    if kind in ("greater_than_equal", "greater_than"):
        return f"must be at least {ctx.get('ge', ctx.get('gt'))}", "too_small"
    if kind in ("less_than_equal", "less_than"):
        return f"must be at most {ctx.get('le', ctx.get('lt'))}", "too_big"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} items", "too_small"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items", "too_big"
    if kind == "missing":
        return "is required", "required"
    if kind in ("uuid_parsing", "uuid_type", "uuid_version"):
        return "must be a UUID", "invalid_uuid"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected', 'the allowed values')}", "invalid_enum_value"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be an object", "invalid_type"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return e.get("msg", "has the wrong type").lower(), "invalid_type"
    if kind == "string_pattern_mismatch":  # the only patterns we use are UUIDs
        return "must be a UUID", "invalid_uuid"
    msg = str(e.get("msg", "is invalid")).removeprefix("Value error, ")
    return msg, str(ctx.get("code", kind or "invalid")) if kind != "value_error" else "invalid"


def as_kairos_error(exc: BaseException) -> E.KairosError:
    """Any failure as a Kairos error: store outages are 503 UNAVAILABLE (retry), the rest 500."""
    if isinstance(exc, E.KairosError):
        return exc
    if isinstance(exc, (RedisError, OSError, TimeoutError)):
        log.warning("store unavailable", error=repr(exc))
        return E.Unavailable("Service temporarily unavailable, please retry", retry_after=1)
    log.exception("unhandled error", exc_info=exc)
    return E.KairosError("Internal server error")


def install(app: Quart) -> None:
    """Register the handlers that make every failure a JSON error body (never HTML, never a 500 page)."""

    @app.errorhandler(E.KairosError)
    async def _kairos(err: E.KairosError) -> Response:
        quota = getattr(err, "quota", None)
        return error_response(err, quota.headers() if quota is not None else None)

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        valid = getattr(exc, "valid_methods", None)  # a 405 says which methods the path takes
        return error_response(from_http_exception(exc), {"Allow": ", ".join(valid)} if valid else None)

    @app.errorhandler(RequestSchemaValidationError)
    async def _schema(exc: RequestSchemaValidationError) -> Response:
        inner = exc.validation_error
        if isinstance(inner, PydanticValidationError):
            return error_response(from_pydantic(inner))
        return error_response(validation_error([{"field": "body", "message": str(inner), "code": "invalid"}]))

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        return error_response(as_kairos_error(exc))
