"""Push notifications go through the real firebase-admin code path to a local fake FCM server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from actors.audit import AuditServices
from actors.push import notices_for
from tests.audit.audit_messages import Lifecycle
from tests.audit.conftest import append, eventually, fetch

pytestmark = pytest.mark.anyio

PROJECT = "kairos-test"


class FakeFcm:
    """FCM v1 `messages:send` plus a Google OAuth token endpoint, on loopback."""

    def __init__(self) -> None:
        self.sent: list[dict] = []  # message bodies accepted
        self.rejected: list[str] = []  # tokens answered UNREGISTERED
        self.unregistered: set[str] = set()
        self.token_requests = 0
        self.auth_headers: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _answer(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/token":
                    fake.token_requests += 1
                    self._answer(200, {"access_token": "fake-access", "expires_in": 3600,
                                       "token_type": "Bearer"})
                    return
                if self.path != f"/v1/projects/{PROJECT}/messages:send":
                    self._answer(404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "?"}})
                    return
                fake.auth_headers.add(self.headers.get("Authorization", ""))
                message = json.loads(body)["message"]
                if message["token"] in fake.unregistered:
                    fake.rejected.append(message["token"])
                    self._answer(404, {"error": {
                        "code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
                        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                     "errorCode": "UNREGISTERED"}]}})
                    return
                fake.sent.append(message)
                self._answer(200, {"name": f"projects/{PROJECT}/messages/{len(fake.sent)}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeFcm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_fcm() -> Iterator[FakeFcm]:
    with FakeFcm() as fake:
        yield fake


@pytest.fixture
def service_account(tmp_path: Path, fake_fcm: FakeFcm) -> str:
    """A service-account file whose OAuth token endpoint is the fake server."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": PROJECT, "private_key_id": "k1",
        "private_key": pem, "client_email": f"push@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": f"{fake_fcm.url}/token",
    }))
    return str(path)


def test_notices_follow_the_events() -> None:
    life = Lifecycle()
    life.create()
    assert notices_for(json.loads(life.start())) == []
    switched = notices_for(json.loads(life.switch(warn=True)))
    assert [(n.participant_id, n.event_type, n.title) for n in switched] == [
        (life.players[1], "cycle_switched", "Your turn"),
        (life.players[1], "time_warning", "Time running low"),
    ]
    assert "0:20 left" in switched[1].body
    paused = notices_for(json.loads(life.pause()))
    assert sorted(n.participant_id for n in paused) == sorted(life.players)


async def test_lifecycle_pushes_reach_fcm_and_unregistered_tokens_are_deleted(
    redis, keys, key_prefix: str, database_url: str, fake_fcm: FakeFcm, service_account: str
) -> None:
    life = Lifecycle()
    a, b = life.players
    dead = f"dead-{life.session_id}"
    fake_fcm.unregistered.add(dead)
    async with AuditServices(redis, key_prefix=key_prefix, database_url=database_url,
                             consumer="push-test", fcm_credentials=service_account,
                             fcm_endpoint=fake_fcm.url) as services:
        await services.register_device(a, f"tok-a-{life.session_id}", "android")
        await services.register_device(b.upper(), f"tok-b-{life.session_id}", "ios")
        await services.register_device(b, dead, "web")
        ta, tb = f"tok-a-{life.session_id}", f"tok-b-{life.session_id}"
        # One change at a time, so the order of deliveries is checked too. Switches go to the
        # new active player (b, a, b); pause/resume/complete to both.
        steps = [
            (life.create(), []), (life.start(), []),
            (life.switch(), [(tb, "cycle_switched")]), (life.switch(), [(ta, "cycle_switched")]),
            (life.switch(), [(tb, "cycle_switched")]),
            (life.pause(), [(ta, "session_paused"), (tb, "session_paused")]),
            (life.resume(), [(ta, "session_resumed"), (tb, "session_resumed")]),
            (life.complete(), [(ta, "session_completed"), (tb, "session_completed")]),
        ]
        expected: list[tuple[str, str]] = []
        for message, deliveries in steps:
            await append(redis, keys, [message])
            expected += deliveries

            async def delivered(n: int = len(expected)) -> bool:
                return len(fake_fcm.sent) >= n

            await eventually(delivered, what=f"{len(expected)} notifications delivered")
            got = [(m["token"], m["data"]["event"]) for m in fake_fcm.sent]
            assert sorted(got) == sorted(expected)
        assert len(fake_fcm.sent) == 3 + 6  # three switches, three events to two players
        assert fake_fcm.rejected == [dead]  # tried once, then forgotten
        first = fake_fcm.sent[0]
        assert first["android"]["collapse_key"] == life.session_id
        assert first["apns"]["headers"]["apns-collapse-id"] == life.session_id
        assert first["notification"]["title"] == "Your turn"
        assert fake_fcm.auth_headers == {"Bearer fake-access"}
        tokens = await fetch(database_url, "SELECT token FROM devices WHERE token LIKE $1",
                             f"%{life.session_id}")
        assert sorted(r["token"] for r in tokens) == sorted(
            [f"tok-a-{life.session_id}", f"tok-b-{life.session_id}"])
        assert services.push.results == {"sent": 9, "unregistered": 1}


async def test_push_is_off_without_credentials(redis, key_prefix: str, database_url: str) -> None:
    async with AuditServices(redis, key_prefix=key_prefix, database_url=database_url,
                             consumer="no-push") as services:
        assert services.push is None
