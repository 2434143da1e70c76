"""Contract tests for every REST route of docs/api.md, against a real `kairos serve` on loopback."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.servers import KairosServer
from tests.web.conftest import bearer, chess_body, new_id, wait_for

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SESSION_KEYS = {
    "session_id", "sync_mode", "status", "version", "participants", "active_participant_id",
    "total_time_ms", "time_per_cycle_ms", "cycle_started_at", "session_started_at",
    "session_completed_at", "increment_ms", "created_at", "updated_at", "server_time_ms",
    "expiry_policy", "visibility", "owner",
}
PARTICIPANT_KEYS = {
    "participant_id", "participant_index", "total_time_ms", "time_used_ms", "time_remaining_ms",
    "cycle_count", "is_active", "has_expired",
}


def iso_to_ms(s: str) -> int:
    from datetime import datetime

    return int(datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000)


def create(http: httpx.Client, **extra: object) -> dict:
    r = http.post("/v1/sessions", json=chess_body(**extra))
    assert r.status_code == 201, r.text
    return r.json()["data"]


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "data" not in body
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---------------- open endpoints ----------------


def test_health_ready_metrics_and_time(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"status": "ready"}
    m = http.get("/metrics")
    assert m.status_code == 200 and "kairos_http_requests_total" in m.text
    t = httpx.get(f"{http.base_url}/v1/time").json()
    assert t["drift_tolerance_ms"] == 50 and t["server_version"] == "2.0.0"
    assert t["implementation"].startswith("kairos-")
    assert t["server_receive_ms"] <= t["server_send_ms"]
    assert abs(t["timestamp_ms"] - t["server_send_ms"]) < 1000


def test_openapi_document_and_docs_page(http: httpx.Client) -> None:
    doc = http.get("/api-docs.json").json()
    assert doc["openapi"].startswith("3")
    assert {"/v1/sessions", "/v1/sessions/{session_id}/switch", "/v1/devices"} <= set(doc["paths"])
    page = http.get("/api-docs")
    assert page.status_code == 200 and "html" in page.headers["content-type"]


def test_unknown_route_and_wrong_method_answer_json(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nope"), 404, "NOT_FOUND")
    assert_error(http.put("/health"), 405, "METHOD_NOT_ALLOWED")


# ---------------- create ----------------


def test_create_returns_201_with_exact_shape(http: httpx.Client) -> None:
    body = chess_body(time_warning_ms=10_000)
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201
    s = r.json()["data"]
    assert set(s) == SESSION_KEYS | {"time_warning_ms"}  # max_time_ms, metadata omitted
    assert s["status"] == "pending" and s["version"] == 1 and s["owner"] == "host-1"
    assert s["active_participant_id"] is None and s["time_per_cycle_ms"] is None
    assert s["cycle_started_at"] is None and s["session_completed_at"] is None
    assert ISO.match(s["created_at"]) and ISO.match(s["updated_at"])
    assert s["expiry_policy"] == "end_session" and s["visibility"] == "private"
    for i, p in enumerate(s["participants"]):
        assert set(p) == PARTICIPANT_KEYS  # group_id omitted
        assert p["participant_index"] == i and p["time_remaining_ms"] == 300_000
    assert [p["participant_id"] for p in s["participants"]] == [
        p["participant_id"] for p in body["participants"]]


def test_create_keeps_optional_fields_and_normalises_ids(http: httpx.Client) -> None:
    sid = new_id().upper()
    g = new_id()
    body = chess_body(sid, sync_mode="count_up", max_time_ms=60_000, metadata={"table": 7},
                      visibility="public", unknown_key="ignored")
    body["participants"][0]["group_id"] = g
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    s = r.json()["data"]
    assert s["session_id"] == sid.lower()
    assert s["max_time_ms"] == 60_000 and s["metadata"] == {"table": 7}
    assert s["visibility"] == "public" and s["participants"][0]["group_id"] == g
    assert http.get(f"/v1/sessions/{sid}").status_code == 200  # case-insensitive lookup


def test_create_existing_id_is_409_but_idempotent_retry_returns_first(http: httpx.Client) -> None:
    body = chess_body()
    first = http.post("/v1/sessions", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201
    again = http.post("/v1/sessions", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 201 and again.json()["data"]["version"] == 1
    assert_error(http.post("/v1/sessions", json=body), 409, "SESSION_EXISTS")


@pytest.mark.parametrize(
    ("mutate", "field", "code"),
    [
        (lambda b: b["participants"][0].update(total_time_ms=5), "participants.0.total_time_ms", "too_small"),
        (lambda b: b["participants"][1].update(total_time_ms=86_400_001), "participants.1.total_time_ms", "too_big"),
        (lambda b: b.update(session_id="nope"), "session_id", "invalid_uuid"),
        (lambda b: b.update(sync_mode="chess"), "sync_mode", "invalid_enum_value"),
        (lambda b: b.update(participants=[]), "participants", "too_small"),
        (lambda b: b["participants"][1].update(participant_id=b["participants"][0]["participant_id"]),
         "participants.1.participant_id", "duplicate"),
        (lambda b: b.update(sync_mode="per_cycle"), "time_per_cycle_ms", "required"),
        (lambda b: b.update(increment_ms=60_001), "increment_ms", "too_big"),
        (lambda b: b.update(metadata={"x": "y" * 11_000}), "metadata", "too_big"),
        (lambda b: b.pop("session_id"), "session_id", "required"),
        (lambda b: b.update(total_time_ms="600000"), "total_time_ms", "invalid_type"),
    ],
)
def test_create_validation_details_use_dotted_paths(http: httpx.Client, mutate, field, code) -> None:
    body = chess_body()
    mutate(body)
    err = assert_error(http.post("/v1/sessions", json=body), 400, "VALIDATION_ERROR")
    assert err["message"] == "Request validation failed"
    assert {"field": field, "code": code} in [{"field": d["field"], "code": d["code"]} for d in err["details"]]
    assert all(set(d) == {"field", "message", "code"} for d in err["details"])


def test_create_example_message_matches_api_examples(http: httpx.Client) -> None:
    body = chess_body()
    body["participants"][0]["total_time_ms"] = 999
    err = assert_error(http.post("/v1/sessions", json=body), 400, "VALIDATION_ERROR")
    assert err["details"] == [{"field": "participants.0.total_time_ms", "message": "must be at least 1000",
                               "code": "too_small"}]


@pytest.mark.parametrize("raw", [b"{bad", b"", b"[1,2]", b'"str"', b'{"a": NaN}', b"[" * 100_000,
                                 b"\xff\xfe", b'{"session_id": 1e999}'])
def test_create_malformed_or_odd_bodies_are_400_never_500(http: httpx.Client, raw: bytes) -> None:
    r = http.post("/v1/sessions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "VALIDATION_ERROR")


def test_body_over_one_megabyte_is_413(http: httpx.Client) -> None:
    r = http.post("/v1/sessions", content=b"x" * (1024 * 1024 + 1), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")


# ---------------- read ----------------


def test_get_reports_live_remaining_time(http: httpx.Client) -> None:
    s = create(http)
    http.post(f"/v1/sessions/{s['session_id']}/start")
    g = http.get(f"/v1/sessions/{s['session_id']}").json()["data"]
    active = next(p for p in g["participants"] if p["is_active"])
    elapsed = g["server_time_ms"] - iso_to_ms(g["cycle_started_at"])
    assert active["total_time_ms"] == 300_000  # bank at the last change
    assert active["time_remaining_ms"] == 300_000 - elapsed
    assert g["version"] == 2


def test_get_bad_id_is_400_and_unknown_is_404(http: httpx.Client) -> None:
    err = assert_error(http.get("/v1/sessions/not-a-uuid"), 400, "VALIDATION_ERROR")
    assert err["details"][0]["field"] == "session_id"
    nil = "00000000-0000-0000-0000-000000000000"
    err = assert_error(http.get(f"/v1/sessions/{nil}"), 404, "SESSION_NOT_FOUND")
    assert err["message"] == f"Session {nil} not found"


# ---------------- lifecycle ----------------


def test_start_pause_resume_complete_and_invalid_transitions(http: httpx.Client) -> None:
    s = create(http)
    sid = s["session_id"]
    err = assert_error(http.post(f"/v1/sessions/{sid}/pause"), 400, "INVALID_STATE_TRANSITION")
    assert err["message"] == f"Session {sid} not running (current status: pending)"
    r = http.post(f"/v1/sessions/{sid}/start", content=b"not json at all")  # non-JSON body = {}
    assert r.status_code == 200 and r.json()["data"]["status"] == "running"
    assert r.json()["data"]["participants"][0]["is_active"] is True
    assert_error(http.post(f"/v1/sessions/{sid}/start"), 400, "INVALID_STATE_TRANSITION")
    paused = http.post(f"/v1/sessions/{sid}/pause").json()["data"]
    assert paused["status"] == "paused" and paused["cycle_started_at"] is None  # as SyncKairos
    running = http.post(f"/v1/sessions/{sid}/resume").json()["data"]
    assert running["status"] == "running" and ISO.match(running["cycle_started_at"])
    done = http.post(f"/v1/sessions/{sid}/complete").json()["data"]
    assert done["status"] == "completed" and ISO.match(done["session_completed_at"])
    assert done["cycle_started_at"] is None
    assert done["version"] == 5
    assert_error(http.post(f"/v1/sessions/{sid}/complete"), 400, "INVALID_STATE_TRANSITION")
    assert_error(http.post(f"/v1/sessions/{new_id()}/start"), 404, "SESSION_NOT_FOUND")
    assert_error(http.post("/v1/sessions/xyz/start"), 400, "VALIDATION_ERROR")


def test_complete_from_pending_is_allowed(http: httpx.Client) -> None:
    s = create(http)
    assert http.post(f"/v1/sessions/{s['session_id']}/complete").json()["data"]["status"] == "completed"


def test_cancel_from_pending_running_or_paused_only(http: httpx.Client, server: KairosServer) -> None:
    for before in ([], ["start"], ["start", "pause"]):
        sid = create(http)["session_id"]
        for action in before:
            assert http.post(f"/v1/sessions/{sid}/{action}").status_code == 200
        r = http.post(f"/v1/sessions/{sid}/cancel", headers={"Idempotency-Key": f"c-{sid}"})
        assert r.status_code == 200, r.text
        d = r.json()["data"]
        assert d["status"] == "cancelled" and d["cycle_started_at"] is None
        assert ISO.match(d["session_completed_at"])
        again = http.post(f"/v1/sessions/{sid}/cancel", headers={"Idempotency-Key": f"c-{sid}"})
        assert again.json()["data"]["version"] == d["version"]  # the retry did not apply twice
        assert_error(http.post(f"/v1/sessions/{sid}/cancel"), 400, "INVALID_STATE_TRANSITION")
    sid = create(http)["session_id"]
    other = bearer(server.token("someone-else"))
    assert_error(http.post(f"/v1/sessions/{sid}/cancel", headers=other), 403, "FORBIDDEN")
    assert_error(http.post(f"/v1/sessions/{new_id()}/cancel"), 404, "SESSION_NOT_FOUND")


# ---------------- switch ----------------


def test_switch_result_shape_and_version(http: httpx.Client) -> None:
    s = create(http)
    sid, (p1, p2) = s["session_id"], [p["participant_id"] for p in s["participants"]]
    http.post(f"/v1/sessions/{sid}/start")
    r = http.post(f"/v1/sessions/{sid}/switch")
    assert r.status_code == 200
    d = r.json()["data"]
    assert set(d) == {"session_id", "active_participant_id", "cycle_started_at", "participants",
                      "status", "version", "server_time_ms"}  # no expiry: key omitted
    assert d["active_participant_id"] == p2 and d["version"] == 3 and d["status"] == "running"
    first = d["participants"][0]
    assert first["total_time_ms"] == 300_000 - first["time_used_ms"] + 3000
    d = http.post(f"/v1/sessions/{sid}/switch", json={"next_participant_id": p1}).json()["data"]
    assert d["active_participant_id"] == p1 and d["version"] == 4
    r = http.post(f"/v1/sessions/{sid}/switch", json={"next_participant_id": "bad"})
    assert_error(r, 400, "VALIDATION_ERROR")


def test_switch_expected_active_mismatch_is_409(http: httpx.Client) -> None:
    s = create(http)
    sid, (p1, p2) = s["session_id"], [p["participant_id"] for p in s["participants"]]
    http.post(f"/v1/sessions/{sid}/start")
    r = http.post(f"/v1/sessions/{sid}/switch", json={"expected_active_participant_id": p2})
    assert_error(r, 409, "CONFLICT")
    r = http.post(f"/v1/sessions/{sid}/switch", json={"expected_active_participant_id": p1})
    assert r.status_code == 200


def test_switch_with_same_idempotency_key_applies_once(http: httpx.Client) -> None:
    s = create(http)
    sid = s["session_id"]
    http.post(f"/v1/sessions/{sid}/start")
    a = http.post(f"/v1/sessions/{sid}/switch", headers={"Idempotency-Key": "sw-1"}).json()["data"]
    b = http.post(f"/v1/sessions/{sid}/switch", headers={"Idempotency-Key": "sw-1"}).json()["data"]
    assert a["version"] == b["version"] == 3
    assert http.get(f"/v1/sessions/{sid}").json()["data"]["version"] == 3
    long_key = {"Idempotency-Key": "k" * 129}
    assert_error(http.post(f"/v1/sessions/{sid}/switch", headers=long_key), 400, "VALIDATION_ERROR")


def test_switch_not_running_is_400(http: httpx.Client) -> None:
    s = create(http)
    assert_error(http.post(f"/v1/sessions/{s['session_id']}/switch"), 400, "INVALID_STATE_TRANSITION")


# ---------------- delete ----------------


def test_delete_is_204_and_idempotent(http: httpx.Client) -> None:
    s = create(http)
    sid = s["session_id"]
    # Make sure the audit already holds a snapshot, so only the tombstone stops a restore.
    wait_for(lambda: http.get(f"/v1/sessions/{sid}/events").json().get("data"))
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error(http.get(f"/v1/sessions/{sid}"), 404, "SESSION_NOT_FOUND")
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error(http.post(f"/v1/sessions/{sid}/start"), 404, "SESSION_NOT_FOUND")
    # The id is free again: a new session under it starts from scratch.
    assert create(http, session_id=sid)["version"] == 1
    assert http.get(f"/v1/sessions/{sid}").json()["data"]["version"] == 1
    assert http.delete(f"/v1/sessions/{new_id()}").status_code == 204
    assert_error(http.delete("/v1/sessions/zzz"), 400, "VALIDATION_ERROR")


# ---------------- events ----------------


def test_events_history_oldest_first_with_paging(http: httpx.Client, server: KairosServer) -> None:
    s = create(http)
    sid = s["session_id"]
    http.post(f"/v1/sessions/{sid}/start")
    http.post(f"/v1/sessions/{sid}/switch")

    def all_three() -> list | None:
        ev = http.get(f"/v1/sessions/{sid}/events").json()["data"]
        return ev if len({e["version"] for e in ev}) >= 3 else None

    events = wait_for(all_three)  # the audit worker copies the outbox asynchronously
    versions = [e["version"] for e in events]
    assert versions == sorted(versions) and versions[0] == 1
    assert events[0]["type"] == "session_created"
    later = http.get(f"/v1/sessions/{sid}/events", params={"after_version": 2}).json()["data"]
    assert later and all(e["version"] > 2 for e in later)
    assert_error(http.get(f"/v1/sessions/{sid}/events", params={"after_version": "x"}), 400, "VALIDATION_ERROR")
    assert_error(http.get(f"/v1/sessions/{new_id()}/events"), 404, "SESSION_NOT_FOUND")


# ---------------- devices and admin ----------------


def test_devices_register_and_delete(http: httpx.Client, server: KairosServer) -> None:
    r = http.post("/v1/devices", json={"token": "fcm-token-1", "platform": "android"})
    assert r.status_code == 201 and r.json()["data"] == {"token": "fcm-token-1", "platform": "android"}
    assert_error(http.post("/v1/devices", json={"token": "t", "platform": "nokia"}), 400, "VALIDATION_ERROR")
    assert_error(http.post("/v1/devices", json={"platform": "ios"}), 400, "VALIDATION_ERROR")
    assert http.delete("/v1/devices/fcm-token-1").status_code == 204
    assert_error(httpx.post(f"{server.url}/v1/devices", json={"token": "t", "platform": "ios"}), 401, "UNAUTHORIZED")
    assert_error(httpx.delete(f"{server.url}/v1/devices/t"), 401, "UNAUTHORIZED")


def test_admin_instances(http: httpx.Client, server: KairosServer) -> None:
    assert_error(http.get("/admin/instances"), 403, "FORBIDDEN")
    r = httpx.get(f"{server.url}/admin/instances", headers=bearer(server.token("root", "admin")))
    assert r.status_code == 200
    ids = [i.get("instance_id") for i in r.json()["data"]]
    assert server.env["KAIROS_INSTANCE_ID"] in ids


def test_rate_limit_headers_on_v1_responses(http: httpx.Client) -> None:
    r = http.get(f"/v1/sessions/{new_id()}")
    assert r.headers["RateLimit-Limit"] == "100000"
    assert int(r.headers["RateLimit-Remaining"]) < 100000
    assert r.headers["RateLimit-Policy"] == "100000;w=60"
    assert 1 <= int(r.headers["RateLimit-Reset"]) <= 60


def test_no_input_makes_a_500(http: httpx.Client) -> None:
    sid = create(http)["session_id"]
    probes = [
        ("POST", f"/v1/sessions/{sid}/switch", b'{"next_participant_id": ["x"]}'),
        ("POST", f"/v1/sessions/{sid}/switch", b'{"expected_active_participant_id": 12}'),
        ("POST", f"/v1/sessions/{sid}/switch", b"[" * 50_000),
        ("POST", "/v1/sessions", json.dumps({"session_id": new_id(), "sync_mode": "global",
                                             "participants": [{"participant_id": new_id(),
                                                               "total_time_ms": 2**70}]}).encode()),
        ("POST", "/v1/sessions", json.dumps(chess_body(metadata=[1, 2])).encode()),
        ("GET", "/v1/sessions/%00", b""),
        ("GET", "/v1/sessions/" + "a" * 5000, b""),
        ("POST", "/v1/devices", b'{"token": "", "platform": "ios"}'),
        ("DELETE", "/v1/devices/" + "%2F" * 10, b""),
    ]
    for method, path, raw in probes:
        r = http.request(method, path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (method, path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json") or r.status_code == 204
