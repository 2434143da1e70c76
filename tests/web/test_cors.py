"""Browser clients: KAIROS_CORS_ORIGINS lets listed origins in (REST and WebSocket), no others."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError
from websockets.asyncio.client import connect

from tests.servers import KairosServer, server_env
from tests.web.conftest import bearer, chess_body
from tests.web.test_web_ws import closed_with
from web.settings import Settings

ALLOWED = "https://app.example"
REFUSED = "https://evil.example"


@pytest.fixture(scope="module")
def cors_server(redis_url: str, database_url: str, module_prefix: str) -> Iterator[KairosServer]:
    env = server_env(redis_url, database_url, module_prefix,
                     KAIROS_CORS_ORIGINS=f"{ALLOWED}, https://other.example")
    with KairosServer(env) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_preflight_of_an_allowed_origin_names_the_headers_a_client_sends(
        cors_server: KairosServer) -> None:
    r = httpx.options(f"{cors_server.url}/v1/sessions", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed


def test_allowed_origin_gets_headers_and_rate_limit_headers_exposed(
        cors_server: KairosServer) -> None:
    headers = {"Origin": ALLOWED, **bearer(cors_server.token("host-1"))}
    r = httpx.post(f"{cors_server.url}/v1/sessions", json=chess_body(), headers=headers)
    assert r.status_code == 201
    assert r.headers["access-control-allow-origin"] == ALLOWED
    exposed = r.headers["access-control-expose-headers"]
    assert "RateLimit-Remaining" in exposed and "Retry-After" in exposed
    assert "Origin" in r.headers["vary"]
    err = httpx.get(f"{cors_server.url}/v1/sessions/nope", headers=headers)  # errors too
    assert err.status_code == 400 and err.headers["access-control-allow-origin"] == ALLOWED


def test_refused_origin_gets_no_cors_headers_and_a_403_preflight(
        cors_server: KairosServer, server: KairosServer) -> None:
    r = httpx.get(f"{cors_server.url}/v1/time", headers={"Origin": REFUSED})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(f"{cors_server.url}/v1/sessions", headers={
        "Origin": REFUSED, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403 and pre.json()["error"]["code"] == "FORBIDDEN"
    # Default (no KAIROS_CORS_ORIGINS): no cross-origin access at all.
    r = httpx.get(f"{server.url}/v1/time", headers={"Origin": ALLOWED})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.anyio
async def test_websocket_checks_origin_against_the_same_list(cors_server: KairosServer) -> None:
    sid = chess_body()["session_id"]  # not created: the socket is accepted all the same
    url = f"{cors_server.ws_url}?sessionId={sid}&token={cors_server.token('host-1')}"
    assert await closed_with(url, {"Origin": REFUSED}) == (1008, "Origin not allowed")
    async with connect(url, additional_headers={"Origin": ALLOWED}) as ws:
        assert json.loads(await ws.recv())["type"] == "CONNECTED"
    async with connect(url) as ws:  # no Origin: not a browser, nothing to check
        assert json.loads(await ws.recv())["type"] == "CONNECTED"


def test_any_origin_needs_auth_off_or_an_explicit_yes() -> None:
    with pytest.raises(ValidationError, match="KAIROS_CORS_ALLOW_ANY_WITH_AUTH"):
        Settings(cors_origins="*")
    assert Settings(cors_origins="*", auth="disabled").cors_origins == ["*"]
    assert Settings(cors_origins="*", cors_allow_any_with_auth=True).cors_origins == ["*"]
    assert Settings(cors_origins="https://a.example,https://b.example").cors_origins == [
        "https://a.example", "https://b.example"]
