"""One error hierarchy for the whole service: each error carries its API code and HTTP status.

Domain and runtime code raise these; `web/errors.py` is the only place that turns them into
REST bodies and WebSocket ERROR frames.
"""

from __future__ import annotations

from typing import Any


class KairosError(Exception):
    """Base error: `code` is the machine-readable API code (docs/api.md), `status` the HTTP status."""

    code: str = "INTERNAL_ERROR"
    status: int = 500

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """Plain form, used to carry an error across instances and into idempotency records."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            out["details"] = self.details
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> KairosError:
        """Rebuild an error from `to_dict()` output (unknown codes become a generic error)."""
        cls = _BY_CODE.get(d.get("code", ""), KairosError)
        err = cls.__new__(cls)
        KairosError.__init__(err, d.get("message", ""), details=d.get("details"))
        if cls is KairosError:
            err.code = d.get("code", "INTERNAL_ERROR")
        if "retry_after" in d:
            err.retry_after = d["retry_after"]  # type: ignore[attr-defined]
        return err


class ValidationError(KairosError):
    """Bad input; `details` is a list of {field, message, code} with dotted paths."""

    code = "VALIDATION_ERROR"
    status = 400


class InvalidStateTransition(KairosError):
    """The command is not allowed in the session's current status."""

    code = "INVALID_STATE_TRANSITION"
    status = 400


class UnknownCommand(KairosError):
    """A WebSocket command frame of a type the server does not know."""

    code = "UNKNOWN_COMMAND"
    status = 400


class Unauthorized(KairosError):
    code = "UNAUTHORIZED"
    status = 401


class Forbidden(KairosError):
    code = "FORBIDDEN"
    status = 403


class SessionNotFound(KairosError):
    code = "SESSION_NOT_FOUND"
    status = 404

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} not found")


class NotFound(KairosError):
    code = "NOT_FOUND"
    status = 404


class Conflict(KairosError):
    """E.g. `expected_active_participant_id` no longer active."""

    code = "CONFLICT"
    status = 409


class SessionExists(KairosError):
    code = "SESSION_EXISTS"
    status = 409


class DeviceTokenTaken(Conflict):
    """The push token is registered by another caller (it stays theirs until they delete it)."""

    code = "DEVICE_TOKEN_TAKEN"


class PayloadTooLarge(KairosError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class _Retryable(KairosError):
    def __init__(self, message: str, *, retry_after: int = 1, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["retry_after"] = self.retry_after
        return out


class RateLimited(_Retryable):
    code = "RATE_LIMIT_EXCEEDED"
    status = 429


class Unavailable(_Retryable):
    """The owner could not be reached before the routing deadline."""

    code = "UNAVAILABLE"
    status = 503


_BY_CODE: dict[str, type[KairosError]] = {
    c.code: c
    for c in (
        ValidationError,
        InvalidStateTransition,
        UnknownCommand,
        Unauthorized,
        Forbidden,
        SessionNotFound,
        NotFound,
        Conflict,
        SessionExists,
        DeviceTokenTaken,
        PayloadTooLarge,
        RateLimited,
        Unavailable,
    )
}
