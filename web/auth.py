"""Bearer-token authentication (JWT) and the authorisation rules of docs/api.md ("Who may do what")."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
import structlog

from kairos.errors import Forbidden, Unauthorized
from kairos.session import Session, Visibility
from web.limits import GeneralLimiter, Quota
from web.settings import Settings

log = structlog.get_logger("kairos.auth")

_SECRET_FILE = "jwt-secret"
_VERIFIED_CACHE = 10_000
_NUMERIC_DATES = ("exp", "nbf", "iat")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the token's `sub` and optional `role`."""

    sub: str
    role: str | None = None

    @property
    def is_admin(self) -> bool:
        """True for the `admin` role."""
        return self.role == "admin"


ANONYMOUS_ADMIN = Caller("anonymous", "admin")


def local_secret(settings: Settings) -> str:
    """The HMAC secret: KAIROS_JWT_SECRET, else one generated once under KAIROS_DATA_DIR.

    The generated secret lets `make serve` + `kairos token` work on a fresh clone with auth on.
    """
    if settings.jwt_secret:
        return settings.jwt_secret
    path = Path(settings.data_dir) / _SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{_SECRET_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # atomic: whoever links first wins, everyone reads the winner
            log.warning("generated a local JWT secret", path=str(path))
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


class Authenticator:
    """Verifies bearer tokens per the configured key and algorithms; `None` key = auth disabled."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self.algorithms = list(settings.jwt_algorithms)
        self.leeway = settings.jwt_leeway_s
        self.key: str | None = None
        self._verified: dict[str, tuple[Caller, float]] = {}
        if self.enabled:
            self.key = settings.verification_key() if settings.jwt_public_key else local_secret(settings)

    def caller(self, authorization: str | None, token: str | None = None) -> Caller:
        """The caller for an `Authorization` header value (or a raw token); raises Unauthorized."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if token is None:
            if not authorization:
                raise Unauthorized("Missing bearer token")
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Missing bearer token")
            token = token.strip()
        hit = self._verified.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        try:
            # `algorithms` is pinned from settings (never from the token header): this refuses
            # `alg: none` and HS256-signed-with-the-public-key confusion.
            claims = jwt.decode(
                token, self.key, algorithms=self.algorithms, leeway=self.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired") from None
        except jwt.PyJWTError:
            raise Unauthorized("Invalid token") from None
        sub = claims.get("sub")
        role = claims.get("role")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("Invalid token")
        for name in _NUMERIC_DATES:
            # RFC 7519 NumericDate: a JSON number. PyJWT compares int(value), so "exp": "179..."
            # (a string) would pass its checks.
            value = claims.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise Unauthorized("Invalid token")
        caller = Caller(sub, role if isinstance(role, str) else None)
        # Verifying a signature costs ~50-150 us, as much as the rest of a switch: remember
        # tokens already verified (keyed by the whole token, signature included) until they expire.
        if len(self._verified) >= _VERIFIED_CACHE:
            self._verified.clear()
        self._verified[token] = (caller, float(claims["exp"]) + self.leeway)
        return caller


async def counted_caller(auth: Authenticator, limiter: GeneralLimiter, address: Callable[[], str],
                   authorization: str | None, token: str | None = None) -> tuple[Caller, Quota | None]:
    """The caller, its request counted against its general limit (per `sub`; per client address
    with auth off). A request that fails authentication counts against the client address, so
    guessing tokens is rate-limited (429) like everything else."""
    try:
        caller = auth.caller(authorization, token)
    except Unauthorized:
        await limiter.hit(address())  # raises RateLimited once the address is over its limit
        raise
    return caller, await limiter.hit(caller.sub if auth.enabled else address())


def mint_token(settings: Settings, sub: str, role: str | None = None, ttl_s: int = 3600, now_s: int | None = None) -> str:
    """A HS256 token signed with the configured (or local) secret, for `kairos token`."""
    now = int(time.time()) if now_s is None else now_s
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_s}
    if role:
        claims["role"] = role
    alg = next((a for a in settings.jwt_algorithms if a.startswith("HS")), "HS256")
    return jwt.encode(claims, local_secret(settings), algorithm=alg)


# ---- authorisation (docs/api.md "Who may do what") ----


def is_participant(state: Session, sub: str) -> bool:
    """True when `sub` is one of the session's participant ids."""
    sub = sub.lower()  # participant ids are stored lower-case
    return any(p.participant_id == sub for p in state.participants)


def can_manage(caller: Caller, state: Session) -> bool:
    """start, pause, resume, complete, delete: owner or admin."""
    return caller.is_admin or caller.sub == state.owner


def require_read(caller: Caller, state: Session) -> None:
    """read, subscribe, events: owner, admin, a participant, or anyone for a public session."""
    if (
        caller.is_admin
        or caller.sub == state.owner
        or state.visibility == Visibility.PUBLIC
        or is_participant(state, caller.sub)
    ):
        return
    raise Forbidden("Not allowed to read this session")


def require_manage(caller: Caller, state: Session) -> None:
    """Raise Forbidden unless owner or admin."""
    if not can_manage(caller, state):
        raise Forbidden("Only the session owner or an admin may do this")


def require_admin(caller: Caller) -> None:
    """Raise Forbidden unless admin."""
    if not caller.is_admin:
        raise Forbidden("Admin role required")


def switch_guard(caller: Caller, state: Session, expected: str | None) -> str | None:
    """Authorise a switch; returns the `expected_active_participant_id` to send to the actor.

    The active participant may switch only its own turn: pinning `expected` to its id makes the
    actor refuse (CONFLICT) if the turn moved on between this check and the command.
    """
    if can_manage(caller, state):
        return expected
    active = state.active
    if active is not None and active.participant_id == caller.sub.lower():
        if expected is not None and expected != active.participant_id:
            raise Forbidden("Only the active participant may switch")
        return active.participant_id
    raise Forbidden("Only the owner, an admin or the active participant may switch")
