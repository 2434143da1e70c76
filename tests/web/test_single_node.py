"""One instance on its own: embedded servers owned, drain of the last instance, clean restarts.

Each test starts real `kairos serve` processes (tests/servers.py) on the fixtures' Redis.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.servers import REPO, KairosServer, server_env
from tests.waiting import wait_for
from tests.web.conftest import bearer, chess_body

pytestmark = pytest.mark.slow


def _metric(srv: KairosServer, name: str, **labels: str) -> float:
    """One sample of `/metrics` (0 when the series does not exist yet)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want
                         else rf"^{re.escape(name)} (\S+)$", re.M)
    m = pattern.search(httpx.get(f"{srv.url}/metrics").text)
    return float(m.group(1)) if m else 0.0


def _running_sessions(srv: KairosServer, n: int, **body: Any) -> list[str]:
    h = bearer(srv.token("alice"))
    sids = []
    for _ in range(n):
        b = chess_body(**body)
        assert httpx.post(f"{srv.url}/v1/sessions", json=b, headers=h).status_code == 201
        assert httpx.post(f"{srv.url}/v1/sessions/{b['session_id']}/start", headers=h).status_code == 200
        sids.append(b["session_id"])
    return sids


def _clock(srv: KairosServer, sid: str) -> dict[str, Any]:
    """version, status and every participant's time used, as of the session's last change."""
    d = httpx.get(f"{srv.url}/v1/sessions/{sid}", headers=bearer(srv.token("alice"))).json()["data"]
    return {"version": d["version"], "status": d["status"], "active": d["active_participant_id"],
            "cycle_started_at": d["cycle_started_at"],
            "used": [p["time_used_ms"] for p in d["participants"]]}


def test_second_serve_on_the_same_folder_is_refused_and_the_first_keeps_serving(
        database_url: str, key_prefix: str) -> None:
    folder = tempfile.mkdtemp(prefix="kairos-shared-")
    env: dict[str, str | None] = {**server_env("", database_url, key_prefix),
                                  "KAIROS_REDIS_URL": None, "KAIROS_DATA_DIR": folder}
    with KairosServer(env) as first:
        second = KairosServer(env)
        with pytest.raises(RuntimeError, match="exited with 2"):
            second.start()
        assert (f"another Kairos is using {folder}; set KAIROS_REDIS_URL or KAIROS_DATA_DIR"
                in second.log_path.read_text())
        assert "Traceback" not in second.log_path.read_text()
        # the refused one touched nothing: the first still serves, with its Redis
        first.wait_ready()
        r = httpx.post(f"{first.url}/v1/sessions", json=chess_body(), headers=bearer(first.token("u")))
        assert r.status_code == 201
    assert first.proc is not None and first.proc.returncode == 0


def test_drain_of_the_last_instance_exits_and_a_restart_finds_every_clock_intact(
        redis_url: str, database_url: str, key_prefix: str) -> None:
    env = server_env(redis_url, database_url, key_prefix, KAIROS_DRAIN_TIMEOUT_S="5")
    with KairosServer(env) as srv:
        sids = _running_sessions(srv, 5)
        before = {sid: _clock(srv, sid) for sid in sids}
        r = httpx.post(f"{srv.url}/admin/drain", headers=bearer(srv.token("ops", "admin")))
        assert r.status_code == 202
        assert r.json()["data"]["plan"] == "no other instance: exiting after checkpoint"
        assert srv.proc is not None
        assert srv.proc.wait(timeout=5) == 0  # within KAIROS_DRAIN_TIMEOUT_S
    with KairosServer(env) as again:
        for sid in sids:
            assert _clock(again, sid) == before[sid]  # same version, same running clock
        h = bearer(again.token("alice"))
        for sid in sids:  # each is claimed again by a command
            assert httpx.post(f"{again.url}/v1/sessions/{sid}/switch", headers=h).status_code == 200
        assert _metric(again, "kairos_leases_claimed_total", reason="released") == len(sids)
        assert _metric(again, "kairos_leases_claimed_total", reason="takeover") == 0


def test_clean_stop_and_start_is_not_a_takeover_and_downtime_is_not_lateness(
        redis_url: str, database_url: str, key_prefix: str) -> None:
    env = server_env(redis_url, database_url, key_prefix, KAIROS_LEASE_TTL_MS="1000")
    with KairosServer(env) as srv:
        # runs out 1 s after its start: while no instance runs
        (short,) = _running_sessions(srv, 1, participants=[
            {"participant_id": str(uuid.uuid4()), "total_time_ms": 1000},
            {"participant_id": str(uuid.uuid4()), "total_time_ms": 1000}])
        started = time.monotonic()
        longer = _running_sessions(srv, 2)
        assert srv.stop() == 0
    wait_for(lambda: time.monotonic() - started > 1.5, what="the short session's deadline to pass")
    with KairosServer(env) as again:
        # the sweeper adopts the overdue session and applies its expiry, without a request
        wait_for(lambda: _clock(again, short)["status"] == "expired", within=10, what="expiry on restart")
        h = bearer(again.token("alice"))
        for sid in longer:
            assert httpx.post(f"{again.url}/v1/sessions/{sid}/switch", headers=h).status_code == 200
        assert _metric(again, "kairos_leases_claimed_total", reason="takeover") == 0
        assert _metric(again, "kairos_leases_claimed_total", reason="released") == 3
        assert _metric(again, "kairos_deadline_lateness_seconds_count") == 0
        assert _metric(again, "kairos_deadline_missed_while_stopped_seconds_count") == 1


def test_stop_logs_each_phase_with_its_duration(database_url: str, key_prefix: str) -> None:
    """With the embedded Redis (whose stop used to take ~4 s of client retries). How long a stop
    takes is measured, not asserted here: see the phases' `ms` in the log."""
    env: dict[str, str | None] = {**server_env("", database_url, key_prefix, KAIROS_LOG_LEVEL="info"),
                                  "KAIROS_REDIS_URL": None}
    with KairosServer(env) as srv:
        _running_sessions(srv, 2)
    assert srv.proc is not None and srv.proc.returncode == 0
    lines = [json.loads(line) for line in srv.log_path.read_text().splitlines()]
    phases = [line["event"] for line in lines if "ms" in line and line["event"] != "request"]
    assert phases == ["drained", "stopped background tasks", "stopped the embedded Redis"]


def test_delete_on_a_single_instance_is_labelled_local(redis_url: str, database_url: str,
                                                        key_prefix: str) -> None:
    with KairosServer(server_env(redis_url, database_url, key_prefix)) as srv:
        (sid,) = _running_sessions(srv, 1)
        assert httpx.delete(f"{srv.url}/v1/sessions/{sid}",
                            headers=bearer(srv.token("alice"))).status_code == 204
        assert _metric(srv, "kairos_command_seconds_count", command="delete", path="local") == 1
        assert _metric(srv, "kairos_command_seconds_count", command="delete", path="forwarded") == 0


def test_token_minted_from_another_folder_is_accepted(redis_url: str, database_url: str,
                                                       key_prefix: str) -> None:
    """KAIROS_DATA_DIR is resolved once (relative to where it was given, or the project root),
    so `kairos token` run elsewhere signs with the secret the server generated."""
    folder = tempfile.mkdtemp(prefix="kairos-secret-")
    env: dict[str, str | None] = {**server_env(redis_url, database_url, key_prefix),
                                  "KAIROS_JWT_SECRET": None, "KAIROS_DATA_DIR": folder}
    with KairosServer(env) as srv:
        token = subprocess.run(
            [sys.executable, "-m", "web.cli", "token", "--sub", "bob"], cwd=tempfile.gettempdir(),
            env={**srv.env}, capture_output=True, text=True, check=True).stdout.strip()
        r = httpx.post(f"{srv.url}/v1/sessions", json=chess_body(), headers=bearer(token))
        assert r.status_code == 201
    # and with nothing set, every folder agrees on one default
    probe = "from web.settings import load; print(load().data_dir)"
    seen = {subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True).stdout
            for cwd in (REPO, tempfile.gettempdir())}
    assert seen == {f"{REPO / '.kairos'}\n"}
