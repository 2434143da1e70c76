"""The API reference served by a live server: a valid OpenAPI 3.1 document whose every operation
lists its errors, and worked examples that validate and that the server accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft7Validator, Draft202012Validator
from openapi_spec_validator import validate

from tests.servers import KairosServer

OPEN = {("get", "/health"), ("get", "/ready"), ("get", "/metrics"), ("get", "/v1/time")}


@pytest.fixture(scope="module")
def doc(server: KairosServer) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/api-docs.json")  # the reference itself needs no token
    assert r.status_code == 200
    return r.json()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def body_schema(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for an inline schema whose `#/components/...` references resolve in `doc`."""
    return Draft202012Validator({**schema, "components": doc["components"]})


def test_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_operation_documents_its_errors_with_the_envelope(doc: dict[str, Any]) -> None:
    responses = doc["components"]["responses"]
    for method, path, op in operations(doc):
        assert any(code.startswith("2") for code in op["responses"]), (method, path)
        if (method, path) in OPEN:
            assert op["security"] == [], (method, path)
            continue
        assert "security" not in op  # the document-wide bearer requirement applies
        for status in ("401", "429"):
            assert op["responses"][status]["$ref"] == f"#/components/responses/Error{status}"
        if "{session_id}" in path:
            assert "400" in op["responses"], (method, path)
    for resp in responses.values():
        media = resp["content"]["application/json"]
        assert media["schema"] == {"$ref": "#/components/schemas/ErrorOut"}
        check = body_schema(doc, doc["components"]["schemas"]["ErrorOut"])
        for example in media["examples"].values():
            check.validate(example["value"])
    assert set(responses["Error429"]["headers"]) >= {"Retry-After", "RateLimit-Limit"}


def test_paths_name_session_id_and_post_commands_take_an_idempotency_key(
        doc: dict[str, Any]) -> None:
    key = {"$ref": "#/components/parameters/IdempotencyKey"}
    assert doc["components"]["parameters"]["IdempotencyKey"]["name"] == "Idempotency-Key"
    for method, path, op in operations(doc):
        assert "raw_id" not in path
        names = {p.get("name") for p in op["parameters"]}
        if "{session_id}" in path:
            param = next(p for p in op["parameters"] if p.get("name") == "session_id")
            assert param["schema"]["format"] == "uuid"
        if path.startswith("/v1/sessions") and method in ("post", "delete"):
            assert key in op["parameters"], (method, path)
        assert "Idempotency-Key" not in names  # always the shared component


def test_formats_and_limits_follow_the_rules(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    create = doc["paths"]["/v1/sessions"]["post"]["requestBody"]["content"]["application/json"]
    props = create["schema"]["properties"]
    assert props["session_id"]["format"] == "uuid"
    assert props["participants"]["maxItems"] == 1000
    warning = next(s for s in props["time_warning_ms"]["anyOf"] if s.get("type") == "integer")
    assert (warning["minimum"], warning["maximum"]) == (0, 86_400_000)
    assert schemas["ParticipantIn"]["properties"]["total_time_ms"]["maximum"] == 86_400_000
    session = schemas["SessionOut"]["properties"]
    assert session["created_at"]["format"] == "date-time"
    assert session["cycle_started_at"]["anyOf"][0]["format"] == "date-time"


def test_examples_validate_and_a_live_server_accepts_them(
        doc: dict[str, Any], http: httpx.Client) -> None:
    create = doc["paths"]["/v1/sessions"]["post"]["requestBody"]["content"]["application/json"]
    assert set(create["examples"]) == {"chess", "quiz", "teams"}
    check = body_schema(doc, create["schema"])
    for name, example in create["examples"].items():
        check.validate(example["value"])
        r = http.post("/v1/sessions", json=example["value"])
        assert r.status_code == 201, (name, r.text)
    chess = create["examples"]["chess"]["value"]["session_id"]
    assert http.post(f"/v1/sessions/{chess}/start").status_code == 200
    switch = doc["paths"]["/v1/sessions/{session_id}/switch"]["post"]["requestBody"]
    media = switch["content"]["application/json"]
    check = body_schema(doc, media["schema"])
    for name in ("guarded", "next"):  # guarded first: participant 1 is active after the start
        check.validate(media["examples"][name]["value"])
        r = http.post(f"/v1/sessions/{chess}/switch", json=media["examples"][name]["value"])
        assert r.status_code == 200, (name, r.text)
    device = doc["paths"]["/v1/devices"]["post"]["requestBody"]["content"]["application/json"]
    for example in device["examples"].values():
        body_schema(doc, device["schema"]).validate(example["value"])
        assert http.post("/v1/devices", json=example["value"]).status_code == 201


# ---------------- the interactive page, offline ----------------


def referenced_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_docs_page_and_every_asset_load_from_the_server_itself(server: KairosServer) -> None:
    page = httpx.get(f"{server.url}/api-docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page.text
    urls = referenced_urls(page.text)
    assert len(urls) == 3  # stylesheet, Swagger UI bundle, our init script
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url  # no other host, no CDN
        asset = httpx.get(f"{server.url}{url}")
        assert asset.status_code == 200 and len(asset.content) > 100, url
    init = httpx.get(f"{server.url}/api-docs/assets/init.js").text
    assert '"/api-docs.json"' in init and "validatorUrl: null" in init  # no call to a validator
    assert httpx.get(f"{server.url}/api-docs/assets/../../app.py").status_code == 404


def test_docs_page_renders_in_a_headless_browser(server: KairosServer, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine: the page and its assets are checked above")
    shot = tmp_path / "api-docs.png"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",  # nothing else reachable
         "--dump-dom", f"{server.url}/api-docs"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Create a session" in dom and "/v1/sessions/{session_id}/switch" in dom
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--virtual-time-budget=10000", f"--screenshot={shot}",
                    "--window-size=1200,900", f"{server.url}/api-docs"],
                   capture_output=True, timeout=60, check=True)
    assert shot.stat().st_size > 10_000


# ---------------- AsyncAPI ----------------


def test_asyncapi_document_is_valid_asyncapi_3(server: KairosServer) -> None:
    doc = httpx.get(f"{server.url}/asyncapi.json").json()
    schema = json.loads((Path(__file__).parent / "schemas" / "asyncapi-3.0.0.json").read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in Draft7Validator(schema).iter_errors(doc)]
    assert errors == []
    assert doc["servers"]["kairos"]["host"] == f"127.0.0.1:{server.port}"
    frames = {m["payload"]["properties"]["type"].get("const")
              for m in doc["components"]["messages"].values()}
    assert {"CONNECTED", "STATE_UPDATE", "STATE_SYNC", "TIME_WARNING", "TIME_EXPIRED",
            "SESSION_DELETED", "PONG", "ACK", "ERROR", "PING", "RECONNECT"} <= frames
    warning = doc["components"]["messages"]["TimeWarning"]["payload"]
    assert "remaining_ms" in warning["required"]  # the field the server sends
