"""WebSocket protocol points of the SyncKairos v2 contract: subscribe before create, CANCEL,
UNKNOWN_COMMAND, and the Forbidden close."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.servers import KairosServer
from tests.web.conftest import bearer, chess_body
from tests.web.test_web_ws import closed_with, make_session

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def recv(ws: ClientConnection, *types: str) -> dict:
    """The next frame of one of `types` (others skipped)."""
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] in types:
            return frame


async def test_socket_to_a_session_not_created_yet_gets_its_updates(server: KairosServer) -> None:
    body = chess_body()
    sid, tok = body["session_id"], server.token("host-1")
    async with connect(f"{server.ws_url}?sessionId={sid}&token={tok}") as ws:
        assert (await recv(ws, "CONNECTED"))["sessionId"] == sid
        await ws.send(json.dumps({"type": "RECONNECT"}))
        err = await recv(ws, "ERROR")
        assert err["code"] == "SESSION_NOT_FOUND"
        await ws.send(json.dumps({"type": "START", "request_id": "s-1"}))
        err = await recv(ws, "ERROR")
        assert (err["code"], err["request_id"]) == ("SESSION_NOT_FOUND", "s-1")
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(tok)) as http:
            assert (await http.post("/v1/sessions", json=body)).status_code == 201
        update = await recv(ws, "STATE_UPDATE")
        assert update["state"]["status"] == "pending" and update["state"]["version"] == 1


async def test_socket_before_create_is_closed_forbidden_when_the_session_is_private(
        server: KairosServer) -> None:
    body = chess_body()
    sid = body["session_id"]
    url = f"{server.ws_url}?sessionId={sid}&token={server.token('stranger')}"
    async with connect(url) as ws:
        assert (await recv(ws, "CONNECTED"))["sessionId"] == sid
        async with httpx.AsyncClient(base_url=server.url,
                                     headers=bearer(server.token("host-1"))) as http:
            assert (await http.post("/v1/sessions", json=body)).status_code == 201
        await ws.wait_closed()
        assert (ws.close_code, ws.close_reason) == (1008, "Forbidden")
    # An existing private session refuses the stranger at once.
    assert await closed_with(url) == (1008, "Forbidden")


async def test_cancel_over_the_socket_and_unknown_commands(server: KairosServer) -> None:
    sid, _ = make_session(server)
    async with connect(f"{server.ws_url}?sessionId={sid}&token={server.token('host-1')}") as ws:
        await recv(ws, "CONNECTED")
        await ws.send(json.dumps({"type": "FLY", "request_id": "u-1"}))
        err = await recv(ws, "ERROR")
        assert (err["code"], err["request_id"]) == ("UNKNOWN_COMMAND", "u-1")
        await ws.send(json.dumps({"type": "FLY"}))  # no request_id: ignored, socket kept
        await ws.send(json.dumps({"type": "START", "request_id": "c-0"}))
        assert (await recv(ws, "ACK", "ERROR"))["request_id"] == "c-0"
        await ws.send(json.dumps({"type": "CANCEL", "request_id": "c-1"}))
        ack = await recv(ws, "ACK", "ERROR")
        assert ack["type"] == "ACK" and ack["request_id"] == "c-1"
        assert ack["data"]["status"] == "cancelled" and ack["data"]["cycle_started_at"] is None
        await ws.send(json.dumps({"type": "CANCEL", "request_id": "c-2"}))
        err = await recv(ws, "ACK", "ERROR")
        assert (err["type"], err["code"]) == ("ERROR", "INVALID_STATE_TRANSITION")
    stranger = f"{server.ws_url}?sessionId={sid}&token={server.token('stranger')}"
    assert await closed_with(stranger) == (1008, "Forbidden")
