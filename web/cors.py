"""Cross-origin access for browser clients (`KAIROS_CORS_ORIGINS`).

Default: no cross-origin access. Listed origins (or `*`) get preflight answers and
`Access-Control-*` headers on every REST response; the WebSocket checks `Origin` against the same
list. No credentials mode: Kairos authenticates with bearer tokens, never cookies.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from quart import Quart, Response, request

from kairos.errors import Forbidden
from web import errors as W

ALLOWED_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-Id"
EXPOSED_HEADERS = ("RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, RateLimit-Policy, "
                   "Retry-After, X-Request-Id")
ALLOWED_METHODS = "GET, POST, DELETE"
MAX_AGE_S = "600"


class Cors:
    """The allowed origins: exact `scheme://host[:port]` strings, or `*` for any."""

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/").lower() for o in origins if o != "*")

    def allows(self, origin: str, host: str | None = None) -> bool:
        """True for a listed origin, any origin with `*`, or the server's own (same-origin) host."""
        if self.any or origin.lower() in self.origins:
            return True
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()

    def headers(self, origin: str) -> dict[str, str]:
        """The headers of an allowed cross-origin response."""
        return {"Access-Control-Allow-Origin": "*" if self.any else origin,
                "Access-Control-Expose-Headers": EXPOSED_HEADERS}


def install(app: Quart, cors: Cors) -> None:
    """Answer preflights and add the CORS headers to every REST response (nothing to do when no
    origin is listed: same-origin requests need no headers)."""
    if not (cors.any or cors.origins):
        return

    @app.before_request
    async def preflight() -> Response | None:
        origin = request.headers.get("Origin")
        if (request.method != "OPTIONS" or origin is None
                or "Access-Control-Request-Method" not in request.headers):
            return None
        if not cors.allows(origin, request.host):
            return W.error_response(Forbidden("Origin not allowed"))
        headers = cors.headers(origin)
        headers.update({"Access-Control-Allow-Methods": ALLOWED_METHODS,
                        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                        "Access-Control-Max-Age": MAX_AGE_S, "Vary": "Origin"})
        return Response(b"", status=204, headers=headers)

    @app.after_request
    async def allow_origin(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if not cors.any:
            response.vary.add("Origin")
        if origin is not None and cors.allows(origin, request.host):
            response.headers.update(cors.headers(origin))
        return response
