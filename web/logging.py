"""One log stream: structlog and every stdlib logger (Hypercorn, asyncpg, httpx, `actors.*`,
warnings) rendered by structlog's stdlib bridge, as JSON lines (production) or key=value
(console, on a terminal), on stderr.

Ids travel in contextvars (`bind_contextvars`), so every log line of a request carries them; the
instance id is added to every line once it is known (`set_instance`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_instance: dict[str, str] = {}
_TIMESTAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _dumps(event: Any, **_kw: Any) -> str:
    # orjson: ~3x faster than json.dumps for an access line; str() whatever it cannot encode
    return orjson.dumps(event, default=str).decode()


def configure_logging(level: str = "info", fmt: str | None = None, instance_id: str | None = None) -> None:
    """Route structlog and the stdlib root logger through one formatter (idempotent)."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    if instance_id:
        set_instance(instance_id)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        _add_instance,
        _TIMESTAMPER,
    ]
    # Lines from stdlib loggers: %-style arguments and `extra=` fields become part of the event.
    foreign = [structlog.stdlib.ExtraAdder(), structlog.stdlib.PositionalArgumentsFormatter(), *shared]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        foreign.append(structlog.processors.format_exc_info)  # tracebacks as a field of the line
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    structlog.reset_defaults()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_CurrentStderr())  # type: ignore[arg-type]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(lvl)
    # Hypercorn gets these logger objects (not "-"), so it adds no handler of its own.
    for name in ("hypercorn.error", "hypercorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    logging.captureWarnings(True)


def set_instance(instance_id: str) -> None:
    """Label every later line with this instance id."""
    _instance["instance_id"] = instance_id


def _add_instance(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if _instance:
        event.setdefault("instance_id", _instance["instance_id"])
    return event


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is now (stdout stays clean for `kairos token`)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
