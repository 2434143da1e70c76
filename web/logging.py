"""structlog configuration: JSON lines (console on a terminal) with request/session/instance ids.

Ids travel in contextvars (`bind_contextvars`), so every log line of a request carries them.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", fmt: str | None = None, instance_id: str | None = None) -> None:
    """Set up structlog and stdlib logging once per process."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if instance_id:
        processors.insert(1, _add_instance(instance_id))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Library loggers (hypercorn errors, asyncio) go to stderr at the same level.
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is now (stdout stays clean for `kairos token`)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _add_instance(instance_id: str):  # noqa: ANN202 - structlog processor
    def add(_logger: object, _name: str, event: dict) -> dict:
        event.setdefault("instance_id", instance_id)
        return event

    return add
