"""Typed settings from the `KAIROS_*` environment variables (docs/configuration.md lists them all).

This is the only module that reads the environment; everything else gets a `Settings` passed in.
`load()` turns a bad value into one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from actors.connection import cluster_url, parse_cluster_url, parse_sentinel_url, sentinel_url

_HMAC_ALGS = {"HS256", "HS384", "HS512"}
_PUBLIC_KEY_ALGS = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
_REPO = Path(__file__).resolve().parent.parent

# Platform conventions (Fly.io, Railway, Heroku-style add-ons) honoured when the KAIROS_* name is unset.
PLATFORM_FALLBACKS = {"port": "PORT", "redis_url": "REDIS_URL", "database_url": "DATABASE_URL",
                      "jwt_secret": "JWT_SECRET"}


def _platform(field: str) -> Any:
    return Field(validation_alias=AliasChoices(f"KAIROS_{field.upper()}", PLATFORM_FALLBACKS[field]))


def default_data_dir() -> Path:
    """`.kairos` at the project root in a source checkout (so `kairos token` run from any folder
    finds the server's secret), else the user's data folder."""
    if (_REPO / "pyproject.toml").is_file():
        return _REPO / ".kairos"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "kairos"


class SettingsError(ValueError):
    """A bad setting; `str()` is the one-line message(s) an operator sees."""


class Settings(BaseSettings):
    """Every setting of a Kairos instance; field `x` is read from `KAIROS_X`."""

    model_config = SettingsConfigDict(env_prefix="KAIROS_", extra="ignore", populate_by_name=True)

    env: Literal["development", "production"] = "development"
    host: str = "0.0.0.0"
    port: Annotated[int, Ge(1), Le(65535), _platform("port")] = 3000
    redis_url: Annotated[str | None, _platform("redis_url")] = None
    # Redis Sentinel (instead of KAIROS_REDIS_URL): "host:port,..." and the monitored master's name;
    # the same as KAIROS_REDIS_URL=redis+sentinel://host:port,.../master (actors/connection.py).
    redis_sentinels: Annotated[list[str], NoDecode] = []
    redis_sentinel_master: str | None = None
    # Redis Cluster (instead of KAIROS_REDIS_URL): "host:port,..." of some of its nodes; the same as
    # KAIROS_REDIS_URL=redis+cluster://host:port,... (docs/scaling.md).
    redis_cluster_nodes: Annotated[list[str], NoDecode] = []
    # Partitions of the outbox stream and the deadline index (sessions by hash); 0 = 1 on one
    # Redis, 16 on a cluster. Fixed for a deployment's life: every instance must use the same.
    redis_partitions: int = Field(0, ge=0, le=1024)
    # Replicas every fenced write and lease claim must reach (WAIT) before it counts: docs/runtime.md.
    redis_min_replicas_ack: int = Field(0, ge=0)
    database_url: Annotated[str | None, _platform("database_url")] = None
    data_dir: str = ""  # "" = default_data_dir(); always absolute after validation
    key_prefix: str = "kairos:"
    instance_id: str | None = None
    lease_ttl_ms: int = Field(5000, ge=100)
    passivate_after_ms: int = Field(60_000, ge=0)
    idempotency_window_s: int = Field(300, ge=1)  # command ids remembered at least this long
    clock_max_error_ms: float = Field(20.0, gt=0)  # above it: not ready, claims no session
    test_clock_skew_ms: int = 0  # tests only: this instance's clock reads this much ahead

    auth: Literal["enabled", "disabled"] = "enabled"
    jwt_secret: Annotated[str | None, _platform("jwt_secret")] = None
    jwt_public_key: str | None = None
    jwt_algorithms: Annotated[list[str], NoDecode] = ["HS256"]
    jwt_leeway_s: int = Field(10, ge=0)

    rate_limit_general: int = Field(100, ge=0)  # requests per caller per minute; 0 = off
    rate_limit_switch: int = Field(10, ge=0)  # switches per session per second; 0 = off
    trusted_proxies: Annotated[list[str], NoDecode] = []  # CIDRs whose X-Forwarded-For we believe
    cors_origins: Annotated[list[str], NoDecode] = []  # browser origins allowed in; "*" = any
    cors_allow_any_with_auth: bool = False  # "*" with authentication on must be asked for

    fcm_credentials: str | None = None
    fcm_endpoint: str | None = None

    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "console"] | None = None  # None: console on a terminal, else json

    drain_timeout_s: float = Field(30.0, ge=0)  # issue 5: bounded drain, default 30 s
    migrate_on_start: bool = True
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    ws_max_frame_bytes: int = Field(64 * 1024, ge=1)
    ws_heartbeat_s: float = Field(5.0, gt=0)
    ws_send_queue: int = Field(256, ge=1)  # frames buffered per socket before we drop it
    workers: int = Field(1, ge=1)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # Resolved once, here: every process and subcommand then agrees on one folder.
        return str(Path(v).expanduser().resolve() if v else default_data_dir())

    @field_validator("jwt_algorithms", "trusted_proxies", "cors_origins", "redis_sentinels", "redis_cluster_nodes",
                     mode="before")
    @classmethod
    def _split_csv(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _check_cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"must be comma-separated CIDRs such as 10.0.0.0/8 ({cidr!r} is not)") from None
        return v

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")):
            raise ValueError("must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL")
        if v and v.startswith("redis+sentinel://"):
            parse_sentinel_url(v)  # a bad one stops the start with its one-line reason
        if v and v.startswith("redis+cluster://"):
            parse_cluster_url(v)
        return v or None

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return v or None

    @field_validator("fcm_credentials")
    @classmethod
    def _check_file(cls, v: str | None) -> str | None:
        if v and not Path(v).is_file():
            raise ValueError("must name a readable file")
        return v

    @model_validator(mode="after")
    def _sentinel_url(self) -> Settings:
        if not self.redis_sentinels:
            return self
        url = sentinel_url(self.redis_sentinels, self.redis_sentinel_master or "")
        # (Worker processes inherit both: the parent passes the URL it composed on.)
        if not self.redis_sentinel_master or self.redis_url not in (None, url):
            raise ValueError("KAIROS_REDIS_SENTINELS needs KAIROS_REDIS_SENTINEL_MASTER and no KAIROS_REDIS_URL")
        self.redis_url = url
        return self

    @model_validator(mode="after")
    def _cluster_url(self) -> Settings:
        if self.redis_cluster_nodes:
            url = cluster_url(self.redis_cluster_nodes)
            if self.redis_sentinels or self.redis_url not in (None, url):
                raise ValueError("KAIROS_REDIS_CLUSTER_NODES needs no KAIROS_REDIS_URL and no KAIROS_REDIS_SENTINELS")
            parse_cluster_url(url)
            self.redis_url = url
        return self

    @property
    def redis_cluster(self) -> bool:
        """True when Redis is a cluster (KAIROS_REDIS_CLUSTER_NODES or a redis+cluster:// URL)."""
        return bool(self.redis_url) and str(self.redis_url).startswith("redis+cluster://")

    @property
    def partitions(self) -> int:
        """KAIROS_REDIS_PARTITIONS with its default filled in (1 on one Redis, 16 on a cluster)."""
        return self.redis_partitions or (16 if self.redis_cluster else 1)

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        # Algorithm confusion: a public key must never be usable as an HMAC secret, and vice versa.
        algs = set(self.jwt_algorithms)
        shown = ",".join(self.jwt_algorithms)
        if "none" in {a.lower() for a in algs}:
            raise ValueError(f"KAIROS_JWT_ALGORITHMS={shown!r}: must not contain 'none'")
        if self.jwt_public_key:
            if "-----BEGIN" not in self.jwt_public_key and not Path(self.jwt_public_key).is_file():
                raise ValueError("KAIROS_JWT_PUBLIC_KEY: must be PEM text or the path of a readable file")
            if not algs <= _PUBLIC_KEY_ALGS:
                raise ValueError(f"KAIROS_JWT_ALGORITHMS={shown!r}: with KAIROS_JWT_PUBLIC_KEY only "
                                 "RS*/ES*/PS* algorithms are allowed")
        elif not algs <= _HMAC_ALGS:
            raise ValueError(f"KAIROS_JWT_ALGORITHMS={shown!r}: with KAIROS_JWT_SECRET only HS* "
                             "algorithms are allowed")
        if "*" in self.cors_origins and self.auth_enabled and not self.cors_allow_any_with_auth:
            raise ValueError("KAIROS_CORS_ORIGINS='*' with authentication on also needs "
                             "KAIROS_CORS_ALLOW_ANY_WITH_AUTH=true")
        return self

    @property
    def auth_enabled(self) -> bool:
        """False only with KAIROS_AUTH=disabled."""
        return self.auth == "enabled"

    def verification_key(self) -> str | None:
        """The key tokens are verified with: the public key (PEM text or a file path) or the secret."""
        if self.jwt_public_key:
            key = self.jwt_public_key
            if "-----BEGIN" not in key:
                with open(key, encoding="utf-8") as f:
                    key = f.read()
            return key
        return self.jwt_secret

    def sources(self) -> dict[str, str]:
        """Which variable each platform-overridable setting came from (`default` if none); for the
        start-up log, which must never show the secret itself."""
        out = {}
        for field, fallback in PLATFORM_FALLBACKS.items():
            own = f"KAIROS_{field.upper()}"
            out[field] = own if os.environ.get(own) else fallback if os.environ.get(fallback) else "default"
        return out

    def production_problems(self) -> list[str]:
        """Why this configuration may not serve with KAIROS_ENV=production (empty when it may):
        embedded servers and a generated secret live in a folder a redeploy throws away."""
        if self.env != "production":
            return []
        problems = []
        if not self.redis_url:
            problems.append("KAIROS_REDIS_URL (or REDIS_URL) is unset")
        if not self.database_url:
            problems.append("KAIROS_DATABASE_URL (or DATABASE_URL) is unset")
        if self.auth_enabled and not (self.jwt_secret or self.jwt_public_key):
            problems.append("KAIROS_JWT_SECRET (or JWT_SECRET, or KAIROS_JWT_PUBLIC_KEY) is unset")
        return problems


def load() -> Settings:
    """Settings from the environment; raises SettingsError with one line per bad value."""
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError("\n".join(_describe(err) for err in e.errors())) from None


def _describe(err: Any) -> str:
    """`KAIROS_PORT='abc': must be an integer 1–65535` for one pydantic error."""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:  # a model-level check already names its variable
        return msg
    name = str(err["loc"][0])
    field = name.lower().removeprefix("kairos_") if name.isupper() else name
    variable = _variable(field)
    info = Settings.model_fields.get(field)
    if err["type"] != "value_error" and info is not None:
        msg = _allowed(info)
    return f"{variable}={err['input']!r}: {msg}"


def _variable(field: str) -> str:
    """The variable an operator set for `field` (the platform name when only that one is set)."""
    fallback = PLATFORM_FALLBACKS.get(field)
    own = f"KAIROS_{field.upper()}"
    return fallback if fallback and own not in os.environ and fallback in os.environ else own


def _allowed(info: Any) -> str:
    """What a field accepts, in words, from its type and bounds."""
    kind = info.annotation
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is Literal or (args and typing.get_origin(args[0]) is Literal):
        choices = typing.get_args(kind if typing.get_origin(kind) is Literal else args[0])
        return "must be one of " + ", ".join(choices)
    lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
    gt = next((m.gt for m in info.metadata if hasattr(m, "gt")), None)
    hi = next((m.le for m in info.metadata if hasattr(m, "le")), None)
    if kind is bool:
        return "must be true or false"
    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        return f"must be {noun} {lo}–{hi}"
    if lo is not None:
        return f"must be {noun} ≥ {lo}"
    if gt is not None:
        return f"must be {noun} > {gt}"
    return f"must be {noun}"
