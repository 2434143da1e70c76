"""The AsyncAPI 3.0 document of the WebSocket protocol, served at `/asyncapi.json`.

Written from the Kairos server's point of view: `send` operations are frames the server sends,
`receive` operations frames it accepts (with the frame it replies with). docs/websocket.md
explains the same protocol in prose; the Session schema is the REST one (`web.schemas`).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from web.openapi import API_VERSION, add_formats
from web.schemas import UUID_PATTERN, ErrorDetail, SessionOut, SwitchResultOut

_MS = {"type": "integer", "description": "server clock, epoch milliseconds"}
_UUID = {"type": "string", "format": "uuid", "pattern": UUID_PATTERN}
_SESSION = {"$ref": "#/components/schemas/SessionOut"}
_REQUEST_ID = {"type": "string", "maxLength": 128,
               "description": "chosen by the client; echoed in the ACK or ERROR that answers it"}

# name -> (frame type, summary, properties, required beyond `type`)
_SERVER_FRAMES: dict[str, tuple[str, str, dict[str, Any], list[str]]] = {
    "Connected": ("CONNECTED", "First frame after the handshake; no state until asked or changed.",
                  {"sessionId": _UUID, "timestamp": _MS}, ["sessionId", "timestamp"]),
    "StateUpdate": ("STATE_UPDATE", "The session changed (any instance, or the server itself: "
                    "expiry, auto-advance).", {"sessionId": _UUID, "timestamp": _MS,
                                               "state": _SESSION},
                    ["sessionId", "timestamp", "state"]),
    "StateSync": ("STATE_SYNC", "The full current state, answering RECONNECT.",
                  {"sessionId": _UUID, "timestamp": _MS, "state": _SESSION},
                  ["sessionId", "timestamp", "state"]),
    "TimeWarning": ("TIME_WARNING", "The active participant's remaining time crossed "
                    "`time_warning_ms`.", {"sessionId": _UUID, "timestamp": _MS,
                                           "participant_id": _UUID,
                                           "remaining_ms": {"type": "integer", "minimum": 0}},
                    ["sessionId", "timestamp", "participant_id", "remaining_ms"]),
    "TimeExpired": ("TIME_EXPIRED", "A participant's time ran out; a STATE_UPDATE follows.",
                    {"sessionId": _UUID, "timestamp": _MS, "participant_id": _UUID,
                     "state": _SESSION}, ["sessionId", "timestamp", "participant_id", "state"]),
    "SessionDeleted": ("SESSION_DELETED", "The session was deleted; the socket then closes "
                       "with 1000 \"Session deleted\".", {"sessionId": _UUID, "timestamp": _MS},
                       ["sessionId", "timestamp"]),
    "Pong": ("PONG", "Answer to PING, with the four-timestamp sync fields.",
             {"timestamp": _MS, "client_time": {"type": "number",
                                                "description": "the PING's, echoed"},
              "server_receive_ms": _MS, "server_send_ms": _MS},
             ["timestamp", "server_receive_ms", "server_send_ms"]),
    "Ack": ("ACK", "A command succeeded: `data` is the Session (SwitchResult for SWITCH).",
            {"request_id": _REQUEST_ID, "data": {"oneOf": [
                _SESSION, {"$ref": "#/components/schemas/SwitchResultOut"}]}},
            ["request_id", "data"]),
    "Error": ("ERROR", "A command or RECONNECT failed; the socket stays open.",
              {"code": {"type": "string", "examples": ["SESSION_NOT_FOUND", "UNKNOWN_COMMAND"]},
               "message": {"type": "string"},
               "details": {"type": "array",
                           "items": {"$ref": "#/components/schemas/ErrorDetail"}},
               "retry_after_seconds": {"type": "integer", "minimum": 0},
               "request_id": _REQUEST_ID}, ["code", "message"]),
}

_COMMAND_TYPES = ["SWITCH", "START", "PAUSE", "RESUME", "COMPLETE", "CANCEL"]
_CLIENT_FRAMES: dict[str, tuple[str | list[str], str, dict[str, Any], list[str]]] = {
    "Ping": ("PING", "Clock sync and liveness; answered by PONG.",
             {"client_time": {"type": "number", "description": "client clock, echoed in PONG"}},
             []),
    "Reconnect": ("RECONNECT", "Ask for the full state; answered by STATE_SYNC (or ERROR "
                  "SESSION_NOT_FOUND / FORBIDDEN).",
                  {"last_version": {"type": ["integer", "null"],
                                    "description": "the last version the client saw"}}, []),
    "Command": (_COMMAND_TYPES, "A session command with REST's rules and rate limits; answered "
                "by ACK or ERROR carrying the same request_id. Unknown types with a request_id "
                "are answered with ERROR UNKNOWN_COMMAND.",
                {"request_id": _REQUEST_ID, "next_participant_id": _UUID,
                 "expected_active_participant_id": _UUID}, ["request_id"]),
}

_REPLIES = {"Ping": ["Pong"], "Reconnect": ["StateSync", "Error"], "Command": ["Ack", "Error"]}


def _message(name: str, kind: str | list[str], summary: str, props: dict[str, Any],
             required: list[str]) -> dict[str, Any]:
    type_schema = {"type": "string", "enum": kind} if isinstance(kind, list) else {"const": kind}
    return {
        "name": name,
        "title": kind if isinstance(kind, str) else " | ".join(kind),
        "summary": summary,
        "contentType": "application/json",
        "payload": {"type": "object", "required": ["type", *required],
                    "properties": {"type": type_schema, **props}},
    }


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (SessionOut, SwitchResultOut, ErrorDetail):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}",
                                         mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    add_formats(schemas)
    frames = {**_SERVER_FRAMES, **_CLIENT_FRAMES}
    messages = {name: _message(name, *spec) for name, spec in frames.items()}
    channel_messages = {name: {"$ref": f"#/components/messages/{name}"} for name in frames}
    operations: dict[str, Any] = {}
    for name in _SERVER_FRAMES:
        operations[f"send{name}"] = {
            "action": "send", "channel": {"$ref": "#/channels/session"},
            "messages": [{"$ref": f"#/channels/session/messages/{name}"}],
            "summary": _SERVER_FRAMES[name][1]}
    for name, replies in _REPLIES.items():
        operations[f"receive{name}"] = {
            "action": "receive", "channel": {"$ref": "#/channels/session"},
            "messages": [{"$ref": f"#/channels/session/messages/{name}"}],
            "summary": _CLIENT_FRAMES[name][1],
            "reply": {"channel": {"$ref": "#/channels/session"},
                      "messages": [{"$ref": f"#/channels/session/messages/{r}"} for r in replies]}}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Kairos WebSocket",
            "version": API_VERSION,
            "description": "Subscribe to one session's changes and send commands over one socket. "
                           "Close codes: 1000 session deleted, 1001 server shutting down, 1008 "
                           "policy (missing/invalid sessionId, Unauthorized, Forbidden, Origin not "
                           "allowed, rate limit), 1009 frame over 64 KB, 1012 instance draining "
                           "(reconnect elsewhere), 1013 client too slow. See docs/websocket.md.",
        },
        "servers": {"kairos": {"host": "localhost:3000", "protocol": "ws",
                               "description": "`make serve`; use wss behind TLS",
                               "security": [{"$ref": "#/components/securitySchemes/token"}]}},
        "defaultContentType": "application/json",
        "channels": {"session": {
            "address": "/ws",
            "title": "One session",
            "description": "`/ws?sessionId=<uuid>&token=<JWT>` (or `Authorization: Bearer`).",
            "messages": channel_messages,
            "bindings": {"ws": {"method": "GET", "bindingVersion": "0.1.0", "query": {
                "type": "object", "required": ["sessionId"],
                "properties": {"sessionId": _UUID,
                               "token": {"type": "string", "description": "JWT (or the header)"}}}}},
        }},
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": schemas,
            "securitySchemes": {"token": {
                "type": "httpApiKey", "name": "token", "in": "query",
                "description": "JWT in the `token` query parameter (or an Authorization: Bearer "
                               "header)."}},
        },
    }


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document (a fresh copy; built once)."""
    return copy.deepcopy(_document())
