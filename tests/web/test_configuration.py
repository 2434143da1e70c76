"""Settings the way platforms inject them, refused bad values, the CLI surface, and the doc."""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.servers import REPO, free_port
from web import cli
from web.settings import PLATFORM_FALLBACKS, Settings, SettingsError, load

SECRET = "platform-secret-0123456789abcdef0123456789"


def _kairos(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`kairos ARGS` with only `env` set (plus what Python needs), as a platform would start it;
    embedded servers (which a refused start must never reach) would go to a fresh folder."""
    base = {"PATH": "/usr/bin:/bin", "KAIROS_DATA_DIR": tempfile.mkdtemp(prefix="kairos-cfg-")}
    return subprocess.run([sys.executable, "-m", "web.cli", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# One of each kind of bad value: not a number, out of range, not a choice, not a boolean,
# wrong URL scheme, bad CIDR, missing file, bad number, rule violation, platform name.
BAD = [
    ("KAIROS_PORT", "abc", "must be an integer 1–65535"),
    ("KAIROS_PORT", "70000", "must be an integer 1–65535"),
    ("PORT", "0", "must be an integer 1–65535"),
    ("KAIROS_LOG_LEVEL", "verbose", "must be one of debug, info, warning, error, critical"),
    ("KAIROS_ENV", "prod", "must be one of development, production"),
    ("KAIROS_MIGRATE_ON_START", "maybe", "must be true or false"),
    ("KAIROS_REDIS_URL", "localhost:6379",
     "must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"),
    ("DATABASE_URL", "mysql://x", "must be a postgresql:// URL"),
    ("KAIROS_TRUSTED_PROXIES", "10.0.0.0/8,bogus", "must be comma-separated CIDRs"),
    ("KAIROS_FCM_CREDENTIALS", "/nonexistent/sa.json", "must name a readable file"),
    ("KAIROS_DRAIN_TIMEOUT_S", "soon", "must be a number ≥ 0"),
    ("KAIROS_WS_HEARTBEAT_S", "0", "must be a number > 0"),
    ("KAIROS_JWT_ALGORITHMS", "none", "must not contain 'none'"),
]


@pytest.mark.parametrize(("variable", "value", "allowed"), BAD, ids=[f"{v}={x}" for v, x, _ in BAD])
def test_bad_setting_is_one_line_naming_variable_value_and_what_is_allowed(
        variable: str, value: str, allowed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAIROS_PORT", "KAIROS_REDIS_URL", "KAIROS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as e:
        load()
    (line,) = str(e.value).splitlines()
    assert line.startswith(f"{variable}={value!r}: ") and allowed in line, line


def test_bad_setting_stops_serve_before_binding_without_a_traceback() -> None:
    port = free_port()
    done = _kairos("serve", env={"KAIROS_PORT": str(port), "KAIROS_LOG_LEVEL": "verbose"}, timeout=20)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("kairos: KAIROS_LOG_LEVEL='verbose': must be one of debug, info, warning, "
                           "error, critical\n")
    with socket.socket() as s:  # nothing was left listening (nor started: no embedded servers)
        s.bind(("0.0.0.0", port))


def test_production_refuses_embedded_servers_and_a_generated_secret() -> None:
    done = _kairos("serve", env={"KAIROS_ENV": "production", "KAIROS_PORT": str(free_port())})
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    for unset in ("KAIROS_REDIS_URL", "KAIROS_DATABASE_URL", "KAIROS_JWT_SECRET"):
        assert unset in done.stderr


def test_platform_names_are_fallbacks_and_the_source_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAIROS_PORT", "KAIROS_REDIS_URL", "KAIROS_DATABASE_URL", "KAIROS_JWT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://p/db")
    monkeypatch.setenv("JWT_SECRET", SECRET)
    s = load()
    assert (s.port, s.redis_url, s.database_url, s.jwt_secret) == (8080, "redis://r:6379/0", "postgresql://p/db", SECRET)
    assert s.sources() == PLATFORM_FALLBACKS  # each came from its platform name
    monkeypatch.setenv("KAIROS_PORT", "3001")  # the KAIROS_* name wins
    assert load().port == 3001 and load().sources()["port"] == "KAIROS_PORT"


def test_start_up_log_names_sources_but_never_the_secret(tmp_path: Path) -> None:
    # unreachable servers make the start fail after the configuration line, before anything binds
    env = {"PORT": str(free_port()), "JWT_SECRET": SECRET, "REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
           "DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/db", "KAIROS_LOG_FORMAT": "json",
           "KAIROS_DATA_DIR": str(tmp_path)}
    done = _kairos("serve", env=env)
    config = next(json.loads(line) for line in done.stderr.splitlines() if '"configuration"' in line)
    assert config["sources"] == PLATFORM_FALLBACKS  # port from PORT, ..., jwt_secret from JWT_SECRET
    assert SECRET not in done.stderr and "hunter2" not in done.stderr and ":pw@" not in done.stderr


def test_version_and_help_on_every_option() -> None:
    done = _kairos("--version")
    assert done.returncode == 0 and re.fullmatch(r"kairos \d+\.\d+\.\d+\S*\n", done.stdout)
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"kairos {name} {action.option_strings}: no help text"


def test_token_options_are_checked() -> None:
    bad_role = _kairos("token", "--sub", "a", "--role", "root", env={"KAIROS_JWT_SECRET": SECRET})
    assert bad_role.returncode == 2 and "invalid choice: 'root' (choose from 'admin')" in bad_role.stderr
    negative = _kairos("token", "--sub", "a", "--ttl", "-5", env={"KAIROS_JWT_SECRET": SECRET})
    assert negative.returncode == 2 and "must be a positive integer" in negative.stderr
    ok = _kairos("token", "--sub", "a", "--role", "admin", "--ttl", "60", env={"KAIROS_JWT_SECRET": SECRET})
    assert ok.returncode == 0 and ok.stdout.count(".") == 2
    production = _kairos("token", "--sub", "a", env={"KAIROS_ENV": "production"})
    assert production.returncode == 2 and "set KAIROS_JWT_SECRET" in production.stderr


def test_settings_error_lists_every_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIROS_PORT", "x")
    monkeypatch.setenv("KAIROS_AUTH", "off")
    with pytest.raises(SettingsError) as e:
        load()
    assert str(e.value).splitlines() == ["KAIROS_PORT='x': must be an integer 1–65535",
                                         "KAIROS_AUTH='off': must be one of enabled, disabled"]


# --- docs/configuration.md lists every setting ------------------------------------------------

_READS = re.compile(r"""(?:environ(?:\.get)?\s*[\[(]\s*|getenv\(\s*)["']([A-Z][A-Z0-9_]+)["']""")


def settings_in_code() -> set[str]:
    """Every variable the service reads: Settings fields (and their platform names), plus any
    direct environment read in the packages (tests' own KAIROS_TEST_* excluded)."""
    names = {f"KAIROS_{f.upper()}" for f in Settings.model_fields} | set(PLATFORM_FALLBACKS.values())
    for package in ("kairos", "actors", "web", "bench"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(_READS.findall(path.read_text(encoding="utf-8")))
    return {n for n in names if n.startswith("KAIROS_") or n in PLATFORM_FALLBACKS.values()}


def test_configuration_doc_lists_every_setting_the_code_reads() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", doc))
    missing = sorted(settings_in_code() - documented)
    assert not missing, f"add these to the table in docs/configuration.md: {missing}"
