"""The examples in README.md and docs/ run against a live server, so the docs cannot drift.

- every ```http request block is sent (in file order, `$TOKEN` = a token with `sub` "alice") and
  the ```http response block after it must match: same status, same keys everywhere, same values
  except clocks (`*_at`, `*_ms` measurements, `timestamp`);
- every ```sh block that talks to `localhost:3000` runs in bash against the server (`make ...`
  lines are skipped: the test runs its own server; other blocks, e.g. benchmark runs, are not
  examples of the API);
- every ```json block parses, and WebSocket frames in docs/websocket.md (`→`/`←` lines) match
  the AsyncAPI document's message schemas.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from jsonschema import Draft202012Validator

from tests.servers import KairosServer

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
# Settings and counts stay the same from run to run; clocks and measured times do not.
STABLE_MS = {"increment_ms", "time_per_cycle_ms", "time_warning_ms", "max_time_ms",
             "drift_tolerance_ms", "retry_after_seconds"}


def blocks(kind: str) -> list[tuple[str, str]]:
    """(file name, block text) of every fenced block of `kind`, in file order."""
    return [(path.name, m.group(2)) for path in DOCS for m in BLOCK.finditer(path.read_text())
            if m.group(1) == kind]


def volatile(key: str) -> bool:
    return key.endswith("_at") or key == "timestamp" or (
        key.endswith("_ms") and key not in STABLE_MS)


def assert_matches(expected: Any, actual: Any, path: str = "") -> None:
    """`actual` has the documented shape and values (clocks excepted)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{path}: keys {sorted(actual) if isinstance(actual, dict) else actual} != "
            f"{sorted(expected)}")
        for key, value in expected.items():
            if not volatile(key):
                assert_matches(value, actual[key], f"{path}.{key}")
            elif value is None:
                assert actual[key] is None, f"{path}.{key} should be null"
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_matches(e, a, f"{path}.{i}")
    else:
        assert actual == expected, f"{path}: {actual!r} != documented {expected!r}"


def parse_request(text: str) -> tuple[str, str, dict[str, str], Any]:
    head, _, body = text.partition("\n\n")
    first, *header_lines = head.strip().splitlines()
    method, path = first.split()
    headers = dict(line.split(": ", 1) for line in header_lines)
    return method, path, headers, json.loads(body) if body.strip() else None


def parse_response(text: str) -> tuple[int, Any]:
    head, _, body = text.partition("\n\n")
    return int(head.split()[1]), json.loads(body) if body.strip() else None


def exchanges() -> list[tuple[str, str, str]]:
    """(file, request block, response block) pairs."""
    out, pending = [], None
    for name, text in blocks("http"):
        if text.startswith("HTTP/"):
            assert pending is not None and pending[0] == name, f"{name}: response without request"
            out.append((name, pending[1], text))
            pending = None
        else:
            assert pending is None, f"{name}: request without response: {pending}"
            pending = (name, text)
    assert pending is None
    return out


def test_http_examples_are_what_a_live_server_answers(server: KairosServer) -> None:
    pairs = exchanges()
    assert len(pairs) >= 10
    token = server.token("alice")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for name, request, response in pairs:
            method, path, headers, body = parse_request(request)
            headers = {k: v.replace("$TOKEN", token) for k, v in headers.items()}
            r = http.request(method, path, headers=headers, json=body)
            status, expected = parse_response(response)
            assert r.status_code == status, f"{name} {method} {path}: {r.text}"
            if expected is not None:
                assert_matches(expected, r.json(), f"{name} {method} {path}")


def test_shell_examples_run_against_a_live_server(server: KairosServer, tmp_path: Path) -> None:
    shell = [(name, text) for name, text in blocks("sh") if "localhost:3000" in text]
    assert shell
    bin_dir = f"{Path(sys.executable).parent}/"
    env = {**os.environ, "KAIROS_JWT_SECRET": server.env["KAIROS_JWT_SECRET"],
           "KAIROS_DATA_DIR": str(tmp_path)}
    for name, text in shell:
        lines = [ln for ln in text.splitlines() if not ln.startswith("make ")]
        script = "\n".join(lines).replace("localhost:3000", f"127.0.0.1:{server.port}")
        script = script.replace(".venv/bin/", bin_dir)
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, f"{name}:\n{script}\n{run.stdout}\n{run.stderr}"
        assert '{"error"' not in run.stdout, f"{name}:\n{script}\n{run.stdout}"


def test_json_blocks_parse_and_websocket_frames_match_the_asyncapi_messages(
        server: KairosServer) -> None:
    for _name, text in blocks("json"):
        json.loads(text)  # raises with the position of the first problem
    doc = httpx.get(f"{server.url}/asyncapi.json").json()
    by_type: dict[str, dict[str, Any]] = {}
    for message in doc["components"]["messages"].values():
        kind = message["payload"]["properties"]["type"]
        for t in kind.get("enum", [kind.get("const")]):
            by_type[t] = message["payload"]
    frames = [line[1:].strip() for _, text in blocks("text") for line in text.splitlines()
              if line.startswith(("→", "←"))]
    assert len(frames) >= 10
    unknown = " ".join(f["message"] for f in map(json.loads, frames)
                       if f.get("code") == "UNKNOWN_COMMAND")
    for frame in map(json.loads, frames):
        if frame["type"] not in by_type:  # only as the example of an unknown command
            assert f"'{frame['type']}'" in unknown, frame
            continue
        schema = {**by_type[frame["type"]], "components": doc["components"]}
        for body in ("state", "data"):  # the transcript shortens Sessions (REST's schema)
            if body in frame:
                frame.pop(body)
                schema["required"] = [k for k in schema["required"] if k != body]
        Draft202012Validator(schema).validate(frame)


def test_the_route_table_of_api_md_lists_the_documented_errors(server: KairosServer) -> None:
    doc = httpx.get(f"{server.url}/api-docs.json").json()
    rows = re.findall(r"^\| `(GET|POST|DELETE) ([^`]+)` \|.*\| ([^|]*) \|$",
                      (ROOT / "docs" / "api.md").read_text(), re.M)
    assert len(rows) == sum(len(item) for item in doc["paths"].values())
    for method, path, errors in rows:
        documented = {s for s in doc["paths"][path][method.lower()]["responses"]
                      if s.startswith(("4", "5"))}
        listed = set(re.findall(r"\b[45]\d\d\b", errors))
        if path == "/ready":
            listed = {"503"}
        assert listed == documented, f"{method} {path}: docs/api.md {sorted(listed)}, OpenAPI {sorted(documented)}"
