"""A local HTTP server impersonating FCM v1 (`messages:send`) and Google's OAuth token endpoint,
and a service-account file pointing at it: push tests run the real firebase-admin code path."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PROJECT = "kairos-test"


class FakeFcm:
    """FCM v1 `messages:send` plus a Google OAuth token endpoint, on loopback."""

    def __init__(self) -> None:
        self.sent: list[dict] = []  # message bodies accepted
        self.rejected: list[str] = []  # tokens answered UNREGISTERED
        self.unregistered: set[str] = set()
        # token -> how many more sends answer 429 QUOTA_EXCEEDED (firebase-admin retries 500/503
        # itself; a quota answer comes back to us to retry)
        self.flaky: dict[str, int] = {}
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
                if fake.flaky.get(message["token"], 0) > 0:
                    fake.flaky[message["token"]] -= 1
                    self._answer(429, {"error": {
                        "code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
                        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                     "errorCode": "QUOTA_EXCEEDED"}]}})
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
