"""One log stream: a real `kairos serve` start, request, WebSocket and stop, every line JSON."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from tests.servers import KairosServer, server_env
from tests.waiting import wait_for
from tests.web.conftest import bearer, chess_body

pytestmark = pytest.mark.slow


def test_every_line_of_a_serve_is_json_with_ids_and_no_secret(redis_url: str, database_url: str,
                                                                key_prefix: str) -> None:
    env = server_env(redis_url, database_url, key_prefix, KAIROS_LOG_LEVEL="info")
    srv = KairosServer(env)
    with srv:
        token = srv.token("alice")
        body = chess_body()
        sid = body["session_id"]
        r = httpx.post(f"{srv.url}/v1/sessions", json=body,
                       headers={**bearer(token), "X-Request-Id": "req-42", "User-Agent": "log-test/1"})
        assert r.status_code == 201 and r.headers["X-Request-Id"] == "req-42"

        async def socket() -> None:
            async with connect(f"{srv.ws_url}?sessionId={sid}&token={token}") as ws:
                assert json.loads(await ws.recv())["type"] == "CONNECTED"

        anyio.run(socket)
        wait_for(lambda: "websocket disconnected" in srv.log_path.read_text(), within=10,
                 what="the disconnect to be logged")
    assert srv.proc is not None and srv.proc.returncode == 0
    text = srv.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object

    assert token not in text and env["KAIROS_JWT_SECRET"] not in text
    events = {line["event"] for line in lines}
    assert {"configuration", "serving", "websocket connected", "websocket disconnected",
            "drained", "stopped background tasks", "http server stopped"} <= events
    assert any(line.get("logger") == "hypercorn.error" for line in lines)  # Hypercorn's own lines
    (access,) = [line for line in lines if line["event"] == "request" and line.get("request_id") == "req-42"]
    assert access["status"] == 201 and access["sub"] == "alice" and access["user_agent"] == "log-test/1"
    assert access["client"] == "127.0.0.1" and access["ms"] >= 0 and access["instance_id"] == srv.env["KAIROS_INSTANCE_ID"]
    (closed,) = [line for line in lines if line["event"] == "websocket disconnected"]
    assert closed["session_id"] == sid and "code" in closed
