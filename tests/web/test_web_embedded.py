"""`kairos serve` with no KAIROS_REDIS_URL / KAIROS_DATABASE_URL: embedded servers, same code path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.servers import KairosServer, server_env
from tests.web.conftest import bearer, chess_body


@pytest.mark.slow
def test_serve_without_urls_starts_embedded_redis_and_postgres(key_prefix: str) -> None:
    env: dict[str, str | None] = {**server_env("", None, key_prefix, KAIROS_LOG_LEVEL="info"),
                                  "KAIROS_REDIS_URL": None, "KAIROS_DATABASE_URL": None}
    srv = KairosServer(env, ready_timeout_s=60)
    with srv:
        srv.wait_ready(30)  # Redis and PostgreSQL both reachable
        log = srv.log_path.read_text()
        assert "started an embedded Redis" in log and "started an embedded PostgreSQL" in log
        r = httpx.post(f"{srv.url}/v1/sessions", json=chess_body(), headers=bearer(srv.token("u")))
        assert r.status_code == 201
        data_dir = srv.env["KAIROS_DATA_DIR"]
    assert srv.proc is not None and srv.proc.returncode == 0
    # one stream: every line JSON; pgserver's initdb dump went to a file under the data dir
    for line in srv.log_path.read_text().splitlines():
        json.loads(line)
    assert "initdb" in (Path(data_dir) / "embedded.log").read_text()
    # the embedded PostgreSQL was stopped with the service
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).find(data_dir) >= 0]
    assert leftovers == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
