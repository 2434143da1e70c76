"""The OpenAPI 3.1 document served at `/api-docs.json`.

quart-schema builds the paths and models from the routes' decorators; `KairosOpenAPI` adds what
it cannot know: each route's error responses (the one error envelope), the `Idempotency-Key`
header, UUID/date-time formats, which routes need no token, and worked request examples.
Routes declare their part with `documented(...)`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

from quart_schema import OpenAPIProvider
from werkzeug.routing import BaseConverter, Rule

from web.schemas import UUID_PATTERN, ErrorOut

API_VERSION = "2.0.0"
"""The wire contract's version (SyncKairos v2 compatible); `GET /v1/time` answers it too."""

API_DESCRIPTION = (
    "Timers in sync across devices (chess clocks, quiz turns, countdowns); SyncKairos v2 "
    "compatible. Send `Authorization: Bearer <JWT>` (Authorize button); `/health`, `/ready`, "
    "`/metrics` and `/v1/time` are open. The WebSocket protocol is at `/asyncapi.json`.")
API_TAGS = [
    {"name": "sessions", "description": "Create sessions and run their clocks."},
    {"name": "time", "description": "The server clock, for client clock sync."},
    {"name": "devices", "description": "Push notification tokens of the caller."},
    {"name": "admin", "description": "Instances, drain and lease owners (admin role)."},
    {"name": "ops", "description": "Health, readiness and metrics (no token)."},
]

F = TypeVar("F", bound=Callable[..., Any])
_DOC_ATTR = "_kairos_doc"
_ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorOut"}

# status -> (description, example error bodies by name)
ERRORS: dict[int, tuple[str, dict[str, dict[str, Any]]]] = {
    400: ("`VALIDATION_ERROR` (bad body, id, query or header; `details` lists each problem) or "
          "`INVALID_STATE_TRANSITION` (the command is not allowed in the session's status).", {
              "validation": {"code": "VALIDATION_ERROR", "message": "Request validation failed",
                             "details": [{"field": "participants.0.total_time_ms",
                                          "message": "must be at least 1000", "code": "too_small"}]},
              "state": {"code": "INVALID_STATE_TRANSITION",
                        "message": "Session 6f1c2b7e-3a41-4c52-9d0e-1b2c3d4e5f60 not running "
                                   "(current status: pending)"}}),
    401: ("`UNAUTHORIZED`: missing, invalid or expired bearer token.", {
        "unauthorized": {"code": "UNAUTHORIZED", "message": "Missing bearer token"}}),
    403: ("`FORBIDDEN`: valid token, but the caller may not do this.", {
        "forbidden": {"code": "FORBIDDEN", "message": "Forbidden"}}),
    404: ("`SESSION_NOT_FOUND`: no session with this id.", {
        "not_found": {"code": "SESSION_NOT_FOUND",
                      "message": "Session 00000000-0000-0000-0000-000000000000 not found"}}),
    409: ("`SESSION_EXISTS` (create with an id in use), `CONFLICT` (switch: the expected "
          "active participant is no longer active) or `DEVICE_TOKEN_TAKEN` (the push token is "
          "registered by another caller).", {
              "exists": {"code": "SESSION_EXISTS", "message": "Session already exists"},
              "conflict": {"code": "CONFLICT", "message": "Active participant changed"},
              "token_taken": {"code": "DEVICE_TOKEN_TAKEN",
                              "message": "This push token is registered by another caller"}}),
    413: ("`PAYLOAD_TOO_LARGE`: the body is over the configured limit (1 MB by default).", {
        "too_large": {"code": "PAYLOAD_TOO_LARGE", "message": "Request body too large"}}),
    429: ("`RATE_LIMIT_EXCEEDED`: the caller's general limit or the session's switch limit; retry "
          "after `Retry-After` seconds (also `retry_after_seconds`).", {
              "rate_limited": {"code": "RATE_LIMIT_EXCEEDED",
                               "message": "Too many requests, please slow down",
                               "retry_after_seconds": 1}}),
    503: ("`UNAVAILABLE`: the store or the session's owner is unreachable right now; retry after "
          "`Retry-After` seconds with the same `Idempotency-Key`.", {
              "unavailable": {"code": "UNAVAILABLE",
                              "message": "Service temporarily unavailable, please retry",
                              "retry_after_seconds": 1}}),
}

_HEADERS: dict[str, dict[str, Any]] = {
    "Retry-After": {"description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 0}},
    "RateLimit-Limit": {"description": "Requests allowed per window.", "schema": {"type": "integer"}},
    "RateLimit-Remaining": {"description": "Requests left in the window.",
                            "schema": {"type": "integer"}},
    "RateLimit-Reset": {"description": "Seconds until the window resets.",
                        "schema": {"type": "integer"}},
    "RateLimit-Policy": {"description": "`<limit>;w=<window seconds>`.", "schema": {"type": "string"}},
}
_RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy")

IDEMPOTENCY_KEY: dict[str, Any] = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Makes a retry safe: the same key on the same session returns the first "
                   "outcome instead of applying the command twice.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    "example": "switch-7f3a-0001",
}

# Worked examples (ids are fixed so the page's "Try it out" works once per session id).
CHESS = {
    "summary": "Chess clock: 5 min each + 3 s Fischer increment",
    "value": {
        "session_id": "6f1c2b7e-3a41-4c52-9d0e-1b2c3d4e5f60",
        "sync_mode": "per_participant",
        "participants": [
            {"participant_id": "223e4567-e89b-12d3-a456-426614174001", "total_time_ms": 300000},
            {"participant_id": "223e4567-e89b-12d3-a456-426614174002", "total_time_ms": 300000}],
        "total_time_ms": 600000,
        "increment_ms": 3000,
        "time_warning_ms": 10000,
    },
}
QUIZ = {
    "summary": "Quiz: 30 s per turn, the server moves the turn on when it runs out",
    "value": {
        "session_id": "7a2d3c8f-4b52-4d63-8e1f-2c3d4e5f6071",
        "sync_mode": "per_cycle",
        "participants": [
            {"participant_id": "323e4567-e89b-12d3-a456-426614174001", "total_time_ms": 600000},
            {"participant_id": "323e4567-e89b-12d3-a456-426614174002", "total_time_ms": 600000},
            {"participant_id": "323e4567-e89b-12d3-a456-426614174003", "total_time_ms": 600000}],
        "time_per_cycle_ms": 30000,
        "expiry_policy": "auto_advance",
        "visibility": "public",
        "metadata": {"title": "Friday quiz"},
    },
}
TEAMS = {
    "summary": "Team game: two teams sharing a 10 min bank each, turns alternate",
    "value": {
        "session_id": "8b3e4d9a-5c63-4e74-9f2a-3d4e5f607182",
        "sync_mode": "per_group",
        "participants": [
            {"participant_id": "423e4567-e89b-12d3-a456-426614174001", "total_time_ms": 600000,
             "group_id": "a0000000-0000-4000-8000-00000000000a"},
            {"participant_id": "423e4567-e89b-12d3-a456-426614174002", "total_time_ms": 600000,
             "group_id": "b0000000-0000-4000-8000-00000000000b"},
            {"participant_id": "423e4567-e89b-12d3-a456-426614174003", "total_time_ms": 600000,
             "group_id": "a0000000-0000-4000-8000-00000000000a"},
            {"participant_id": "423e4567-e89b-12d3-a456-426614174004", "total_time_ms": 600000,
             "group_id": "b0000000-0000-4000-8000-00000000000b"}],
        "increment_ms": 1000,
        "expiry_policy": "skip_participant",
    },
}
CREATE_EXAMPLES = {"chess": CHESS, "quiz": QUIZ, "teams": TEAMS}
SWITCH_EXAMPLES = {
    "next": {"summary": "End the turn; the next participant in rotation plays", "value": {}},
    "guarded": {"summary": "Only if participant 1 is still active (no double switch)",
                "value": {"expected_active_participant_id": "223e4567-e89b-12d3-a456-426614174001"}},
}
DEVICE_EXAMPLES = {
    "android": {"summary": "An FCM registration token", "value": {"token": "fcm-token-123",
                                                                   "platform": "android"}},
}
REQUEST_EXAMPLES = {"CreateSession": CREATE_EXAMPLES, "SwitchBody": SWITCH_EXAMPLES,
                    "DeviceIn": DEVICE_EXAMPLES}

# Response-model fields that carry ids or timestamps (the wire builds them as plain strings).
_UUID_FIELDS = {"session_id", "participant_id", "active_participant_id", "group_id",
                "expired_participant_id", "next_participant_id", "expected_active_participant_id"}
_TIME_FIELDS = {"cycle_started_at", "session_started_at", "session_completed_at", "created_at",
                "updated_at"}


def documented(*errors: int, idempotent: bool = False, open_route: bool = False,
               success: tuple[int, str] | None = None) -> Callable[[F], F]:
    """Declare a route's error statuses (see `ERRORS`), whether it honours `Idempotency-Key`,
    whether it needs no token, and a body-less success (`(204, "Deleted")`)."""
    unknown = set(errors) - ERRORS.keys()
    assert not unknown, f"undocumented error statuses {unknown}"

    def mark(func: F) -> F:
        setattr(func, _DOC_ATTR, {"errors": errors, "idempotent": idempotent,
                                  "open": open_route, "success": success})
        return func

    return mark


class KairosOpenAPI(OpenAPIProvider):
    """quart-schema's provider plus Kairos's error responses, headers, formats and examples."""

    _cached: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        """The finished document (built once: the routes do not change while serving)."""
        if self._cached is None:
            doc = super().schema()
            doc["openapi"] = "3.1.0"
            _finish_components(doc)
            self._cached = doc
        return copy.deepcopy(self._cached)

    def build_path_parameter(self, name: str, converter: BaseConverter) -> dict[str, Any]:
        """`session_id` is a UUID; other path parameters are free strings."""
        param = super().build_path_parameter(name, converter)
        if name == "session_id":
            param["schema"] = {"type": "string", "format": "uuid", "pattern": UUID_PATTERN}
            param["description"] = "The session's id (any UUID version, case-insensitive)."
            param["example"] = CHESS["value"]["session_id"]
        return param

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each operation with its documented errors, headers and security."""
        paths, components = super().build_paths(rule)
        meta = getattr(self._app.view_functions[rule.endpoint], _DOC_ATTR, None)
        if meta is None:
            return paths, components
        for operations in paths.values():
            for method, op in operations.items():
                operations[method] = _operation(op, meta)
        return paths, components


def _operation(op: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    op = dict(op)
    op["parameters"] = list(op.get("parameters", []))
    responses = op["responses"] = dict(op.get("responses", {}))
    if meta["success"] is not None:
        status, text = meta["success"]
        responses[status] = {"description": text}
    for status in meta["errors"]:
        responses[status] = {"$ref": f"#/components/responses/Error{status}"}
    if meta["idempotent"]:
        op["parameters"].append({"$ref": "#/components/parameters/IdempotencyKey"})
    if meta["open"]:
        op["security"] = []
    elif 429 not in meta["errors"]:
        raise AssertionError(f"{op.get('operationId')}: every authenticated route can answer 429")
    return op


def _finish_components(doc: dict[str, Any]) -> None:
    comps = doc.setdefault("components", {})
    comps["parameters"] = {"IdempotencyKey": IDEMPOTENCY_KEY}
    comps["headers"] = copy.deepcopy(_HEADERS)
    responses = comps["responses"] = {}
    for status, (text, examples) in ERRORS.items():
        resp: dict[str, Any] = {
            "description": text,
            "content": {"application/json": {
                "schema": _ERROR_SCHEMA,
                "examples": {name: {"value": {"error": body}} for name, body in examples.items()},
            }},
        }
        if status in (429, 503):
            names = ("Retry-After", *_RATE_HEADERS) if status == 429 else ("Retry-After",)
            resp["headers"] = {h: {"$ref": f"#/components/headers/{h}"} for h in names}
        responses[f"Error{status}"] = resp
    schemas = comps.setdefault("schemas", {})
    error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorOut"] = error_schema
    add_formats(doc)
    for path_item in doc.get("paths", {}).values():
        for op in path_item.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            title = body.get("schema", {}).get("title", "")
            if title == "CreateSession":
                body["schema"]["description"] = (
                    "POST /v1/sessions body. `total_time_ms` is required for `global`, "
                    "`time_per_cycle_ms` for `per_cycle`; `metadata` is at most 10 KB of JSON; "
                    "unknown keys are ignored.")
            if title in REQUEST_EXAMPLES:
                body["examples"] = copy.deepcopy(REQUEST_EXAMPLES[title])


def add_formats(node: Any, field: str | None = None) -> None:
    """Walk the document: UUID patterns and id fields get `format: uuid`, times `date-time`."""
    if isinstance(node, list):
        for item in node:
            add_formats(item, field)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "string" and "format" not in node:
        if node.get("pattern") == UUID_PATTERN or field in _UUID_FIELDS:
            node["format"] = "uuid"
        elif field in _TIME_FIELDS:
            node["format"] = "date-time"
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            for name, sub in value.items():
                add_formats(sub, name)
        elif key in ("anyOf", "oneOf", "allOf", "items"):
            add_formats(value, field)
        elif key not in ("examples", "example", "default", "enum", "const"):
            add_formats(value)
