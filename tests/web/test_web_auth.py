"""Security model (docs/api.md, "Who may do what"): every role x action, bad tokens, algorithm confusion, rate limits, drain."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.servers import KairosServer, server_env
from tests.web.conftest import at_a_fresh_rate_window, bearer, chess_body, new_id

# ---------------- fixtures ----------------


@pytest.fixture(scope="module")
def limited(redis_url: str, database_url: str, module_prefix: str) -> Iterator[KairosServer]:
    """Small limits so 429s are reachable: 40 requests/min per caller, 2 switches/s per session.
    A deployment of its own (key prefix): the general limit is counted per deployment, in Redis."""
    env = server_env(redis_url, database_url, f"{module_prefix}limited:",
                     KAIROS_RATE_LIMIT_GENERAL="40", KAIROS_RATE_LIMIT_SWITCH="2")
    with KairosServer(env) as srv:
        srv.wait_ready()
        yield srv


# One client for the module: `CLIENT.get()` builds a fresh TLS context per call (~0.1 s here).
CLIENT = httpx.Client(timeout=10)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict, claims: dict, key: bytes | None) -> str:
    """Hand-made JWT (pyjwt refuses to make the malicious ones)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


class Roles:
    """One session and a token per role of the security model."""

    def __init__(self, srv: KairosServer, **extra: object) -> None:
        self.srv = srv
        self.body = chess_body(**extra)
        self.sid = self.body["session_id"]
        self.p1, self.p2 = (p["participant_id"] for p in self.body["participants"])
        self.tokens = {
            "owner": srv.token("owner-1"),
            "admin": srv.token("root", "admin"),
            "active": srv.token(self.p1),
            "inactive": srv.token(self.p2),
            "stranger": srv.token("someone-else"),
        }
        r = CLIENT.post(f"{srv.url}/v1/sessions", json=self.body, headers=bearer(self.tokens["owner"]))
        assert r.status_code == 201, r.text
        r = CLIENT.post(f"{srv.url}/v1/sessions/{self.sid}/start", headers=bearer(self.tokens["owner"]))
        assert r.status_code == 200

    def call(self, role: str, method: str, path: str) -> httpx.Response:
        return CLIENT.request(method, f"{self.srv.url}{path}", headers=bearer(self.tokens[role]))


ACTIONS = {  # action -> (method, path template, roles allowed on a private session)
    "read": ("GET", "/v1/sessions/{sid}", {"owner", "admin", "active", "inactive"}),
    "events": ("GET", "/v1/sessions/{sid}/events", {"owner", "admin", "active", "inactive"}),
    "switch": ("POST", "/v1/sessions/{sid}/switch", {"owner", "admin", "active"}),
    "pause": ("POST", "/v1/sessions/{sid}/pause", {"owner", "admin"}),
    "complete": ("POST", "/v1/sessions/{sid}/complete", {"owner", "admin"}),
    "delete": ("DELETE", "/v1/sessions/{sid}", {"owner", "admin"}),
    "instances": ("GET", "/admin/instances", {"admin"}),
}
ROLES = ["owner", "admin", "active", "inactive", "stranger"]


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("role", ROLES)
def test_role_matrix(server: KairosServer, role: str, action: str) -> None:
    method, path, allowed = ACTIONS[action]
    s = Roles(server)
    r = s.call(role, method, path.format(sid=s.sid))
    if role in allowed:
        assert r.status_code in (200, 204), (role, action, r.text)
    else:
        assert r.status_code == 403, (role, action, r.text)
        assert r.json()["error"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize("role", ROLES)
def test_start_and_resume_need_owner_or_admin(server: KairosServer, role: str) -> None:
    s = Roles(server)
    CLIENT.post(f"{server.url}/v1/sessions/{s.sid}/pause", headers=bearer(s.tokens["owner"]))
    r = s.call(role, "POST", f"/v1/sessions/{s.sid}/resume")
    assert r.status_code == (200 if role in ("owner", "admin") else 403)


@pytest.mark.parametrize("role", ROLES)
def test_public_session_is_readable_by_anyone_authenticated(server: KairosServer, role: str) -> None:
    s = Roles(server, visibility="public")
    assert s.call(role, "GET", f"/v1/sessions/{s.sid}").status_code == 200
    assert s.call(role, "POST", f"/v1/sessions/{s.sid}/pause").status_code == (
        200 if role in ("owner", "admin") else 403)


@pytest.mark.parametrize("role", ROLES)
def test_subscribe_follows_the_read_rule(server: KairosServer, role: str) -> None:
    s = Roles(server)
    with connect(f"{server.ws_url}?sessionId={s.sid}&token={s.tokens[role]}") as ws:
        if role == "stranger":
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        else:
            assert json.loads(ws.recv(timeout=5))["type"] == "CONNECTED"


def test_inactive_participant_cannot_switch_over_the_socket(server: KairosServer) -> None:
    s = Roles(server)
    with connect(f"{server.ws_url}?sessionId={s.sid}&token={s.tokens['inactive']}") as ws:
        ws.recv(timeout=5)
        ws.send(json.dumps({"type": "SWITCH", "request_id": "x"}))
        frame = json.loads(ws.recv(timeout=5))
        assert (frame["type"], frame["code"], frame["request_id"]) == ("ERROR", "FORBIDDEN", "x")


def test_creator_becomes_owner(server: KairosServer) -> None:
    s = Roles(server)
    r = s.call("owner", "GET", f"/v1/sessions/{s.sid}")
    assert r.json()["data"]["owner"] == "owner-1"


# ---------------- tokens ----------------


def bad_tokens(srv: KairosServer) -> dict[str, str]:
    now = int(time.time())
    secret = srv.env["KAIROS_JWT_SECRET"].encode()
    return {
        "forged": jwt.encode({"sub": "x", "exp": now + 60}, "wrong-secret-0123456789abcdef0123", algorithm="HS256"),
        "expired": jwt.encode({"sub": "x", "exp": now - 3600}, secret, algorithm="HS256"),
        "no_exp": jwt.encode({"sub": "x"}, secret, algorithm="HS256"),
        "no_sub": jwt.encode({"exp": now + 60}, secret, algorithm="HS256"),
        "alg_none": raw_token({"alg": "none", "typ": "JWT"}, {"sub": "x", "exp": now + 60}, None),
        "hs384_not_allowed": jwt.encode({"sub": "x", "exp": now + 60}, secret + secret, algorithm="HS384"),
        "garbage": "abc.def.ghi",
        "not_yet_valid": jwt.encode({"sub": "x", "exp": now + 3600, "nbf": now + 600}, secret, algorithm="HS256"),
    }


@pytest.mark.parametrize("kind", ["forged", "expired", "no_exp", "no_sub", "alg_none", "hs384_not_allowed",
                                  "garbage", "not_yet_valid", "missing", "wrong_scheme"])
def test_bad_tokens_are_401(server: KairosServer, kind: str) -> None:
    if kind == "missing":
        headers = {}
    elif kind == "wrong_scheme":
        headers = {"Authorization": f"Basic {server.token('x')}"}
    else:
        headers = bearer(bad_tokens(server)[kind])
    r = CLIENT.post(f"{server.url}/v1/sessions", json=chess_body(), headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"


def test_open_routes_need_no_token(server: KairosServer) -> None:
    for path in ("/health", "/ready", "/metrics", "/v1/time", "/api-docs.json"):
        assert CLIENT.get(f"{server.url}{path}").status_code == 200, path


@pytest.fixture(scope="module")
def es256_server(redis_url: str, database_url: str, module_prefix: str, tmp_path_factory: pytest.TempPathFactory):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("keys") / "pub.pem"
    path.write_bytes(pem)
    env = server_env(redis_url, database_url, module_prefix, KAIROS_JWT_PUBLIC_KEY=str(path),
                     KAIROS_JWT_ALGORITHMS="ES256", KAIROS_JWT_SECRET="")
    with KairosServer(env) as srv:
        yield srv, key, pem


def test_public_key_tokens_and_algorithm_confusion(es256_server) -> None:
    srv, key, pem = es256_server
    now = int(time.time())
    good = jwt.encode({"sub": "k-user", "exp": now + 60}, key, algorithm="ES256")
    r = CLIENT.post(f"{srv.url}/v1/sessions", json=chess_body(), headers=bearer(good))
    assert r.status_code == 201 and r.json()["data"]["owner"] == "k-user"
    # HS256 signed with the public key's PEM as the HMAC secret: the classic confusion attack.
    confused = raw_token({"alg": "HS256", "typ": "JWT"}, {"sub": "evil", "exp": now + 60}, pem)
    r = CLIENT.post(f"{srv.url}/v1/sessions", json=chess_body(), headers=bearer(confused))
    assert r.status_code == 401


def test_settings_refuse_confusable_or_none_algorithms() -> None:
    from pydantic import ValidationError

    from web.settings import Settings

    with pytest.raises(ValidationError):
        Settings(jwt_public_key="-----BEGIN PUBLIC KEY-----x", jwt_algorithms=["HS256"])
    with pytest.raises(ValidationError):
        Settings(jwt_secret="s", jwt_algorithms=["RS256"])
    with pytest.raises(ValidationError):
        Settings(jwt_secret="s", jwt_algorithms=["none"])


# ---------------- rate limits ----------------


def test_switch_limit_per_session_is_429_with_retry_after(limited: KairosServer) -> None:
    s = Roles(limited)
    codes = [s.call("owner", "POST", f"/v1/sessions/{s.sid}/switch").status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and 429 in codes[2:]
    r = s.call("owner", "POST", f"/v1/sessions/{s.sid}/switch")
    if r.status_code == 429:
        err = r.json()["error"]
        assert err["code"] == "RATE_LIMIT_EXCEEDED" and err["retry_after_seconds"] >= 1
        assert int(r.headers["Retry-After"]) >= 1


def test_general_limit_per_caller_is_429_with_headers(limited: KairosServer) -> None:
    headers = bearer(limited.token("busy-caller"))
    url = f"{limited.url}/v1/sessions/{new_id()}"
    at_a_fresh_rate_window()
    statuses = [CLIENT.get(url, headers=headers) for _ in range(41)]
    assert [r.status_code for r in statuses[:40]] == [404] * 40
    last = statuses[40]
    assert last.status_code == 429
    assert last.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert last.headers["RateLimit-Remaining"] == "0" and last.headers["RateLimit-Limit"] == "40"
    assert last.headers["RateLimit-Policy"] == "40;w=60"
    assert 1 <= int(last.headers["Retry-After"]) <= 60
    # another caller is not affected
    assert CLIENT.get(url, headers=bearer(limited.token("calm-caller"))).status_code == 404


# ---------------- drain ----------------


def test_drain_is_admin_only_then_closes_sockets_1012_and_unreadies(limited: KairosServer) -> None:
    s = Roles(limited)
    assert s.call("owner", "POST", "/admin/drain").status_code == 403
    with connect(f"{limited.ws_url}?sessionId={s.sid}&token={s.tokens['owner']}") as ws:
        ws.recv(timeout=5)
        r = s.call("admin", "POST", "/admin/drain")
        assert r.status_code == 202
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=10)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1012, "Service restart")
    ready = CLIENT.get(f"{limited.url}/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
