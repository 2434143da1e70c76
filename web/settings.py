"""Typed settings from the `KAIROS_*` environment variables (DESIGN.md's table plus web knobs).

This is the only module that reads the environment; everything else gets a `Settings` passed in.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_HMAC_ALGS = {"HS256", "HS384", "HS512"}
_PUBLIC_KEY_ALGS = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}


class Settings(BaseSettings):
    """Every setting of a Kairos instance; field `x` is read from `KAIROS_X`."""

    model_config = SettingsConfigDict(env_prefix="KAIROS_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(3000, ge=0, le=65535)
    redis_url: str | None = None
    database_url: str | None = None
    data_dir: str = "./.kairos"
    key_prefix: str = "kairos:"
    instance_id: str | None = None
    lease_ttl_ms: int = Field(5000, ge=100)
    passivate_after_ms: int = Field(60_000, ge=0)
    idempotency_window_s: int = Field(300, ge=1)  # command ids remembered at least this long

    auth: Literal["enabled", "disabled"] = "enabled"
    jwt_secret: str | None = None
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

    log_level: str = "info"
    log_format: Literal["json", "console"] | None = None  # None: console on a terminal, else json

    drain_timeout_s: float = Field(30.0, ge=0)  # issue 5: bounded drain, default 30 s
    migrate_on_start: bool = True
    max_body_bytes: int = 1024 * 1024
    ws_max_frame_bytes: int = 64 * 1024
    ws_heartbeat_s: float = 5.0
    ws_send_queue: int = Field(256, ge=1)  # frames buffered per socket before we drop it
    workers: int = Field(1, ge=1)

    @field_validator("jwt_algorithms", "trusted_proxies", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _check_cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            ipaddress.ip_network(cidr, strict=False)
        return v

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        # Algorithm confusion: a public key must never be usable as an HMAC secret, and vice versa.
        algs = set(self.jwt_algorithms)
        if "none" in {a.lower() for a in algs}:
            raise ValueError("KAIROS_JWT_ALGORITHMS must not contain 'none'")
        if self.jwt_public_key:
            if not algs <= _PUBLIC_KEY_ALGS:
                raise ValueError("with KAIROS_JWT_PUBLIC_KEY only RS*/ES*/PS* algorithms are allowed")
        elif not algs <= _HMAC_ALGS:
            raise ValueError("with KAIROS_JWT_SECRET only HS* algorithms are allowed")
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
