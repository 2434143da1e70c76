"""HTTP protocol hygiene, the same for every route: query strings no store can keep are refused,
security headers on every response, an answer given before the body was read (401, 413) reaches
a client that writes the whole body first, and Hypercorn's own protocol errors (431, 400) carry the
JSON error body.
"""

from __future__ import annotations

import json
from itertools import chain

import anyio
from quart import Quart, Response, request

from web import errors as W
from web.schemas import unstorable

# A body over the limit is still read (and thrown away) up to this size, so the client gets its
# 413 instead of a connection reset; beyond it (or after the timeout) the connection is closed.
DISCARD_LIMIT_BYTES = 16 * 1024 * 1024
DISCARD_TIMEOUT_S = 10.0
DOCS_PATH = "/api-docs"
# The Swagger UI page loads only its own vendored files (web/apidocs.py) and /api-docs.json;
# its styles are set inline by the bundle. Everything else answers JSON and may load nothing.
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def install(app: Quart) -> None:
    """Register the hooks and handlers on `app` (after `quart_schema.QuartSchema(app)`)."""

    @app.before_request
    async def refuse_unstorable_query() -> None:
        problems = list(chain.from_iterable(
            unstorable([key, *values], key)[:1] for key, values in request.args.lists()))
        if problems:
            raise W.validation_error([{**p, "field": p["field"].split(".")[0]} for p in problems])

    @app.after_request
    async def security_headers(response: Response) -> Response:
        h = response.headers
        h["X-Content-Type-Options"] = "nosniff"
        h.setdefault("Cache-Control", "no-store")  # the docs assets set their own (versioned URLs)
        h.setdefault("Content-Security-Policy", DOCS_CSP if request.path == DOCS_PATH else API_CSP)
        return response

    @app.after_request
    async def finish_reading_the_body(response: Response) -> Response:
        # An answer given before the request body has fully arrived (a 401 or 413 decided on the
        # headers) makes Hypercorn close the connection with the body unread: a client that
        # writes the whole body first sees a reset instead of the answer, and a keep-alive client
        # (1-2% of fast 401s here) a dropped connection on its next request.
        await _discard_body()
        return response


async def _discard_body() -> None:
    """Wait for the rest of the request body (Quart keeps at most the body limit of it, and
    nothing once over the limit), up to DISCARD_LIMIT_BYTES and DISCARD_TIMEOUT_S."""
    # Quart's Body sets `_complete` once the whole body has been received; there is no public
    # way to wait for the end of a body the route did not read.
    complete = getattr(request.body, "_complete", None)
    if complete is None or complete.is_set():
        return
    length = request.content_length
    if length is not None and length > DISCARD_LIMIT_BYTES:
        return
    with anyio.move_on_after(DISCARD_TIMEOUT_S):
        await complete.wait()


def patch_hypercorn() -> None:
    """Hypercorn answers requests it cannot parse (headers over its limit: 431, malformed: 400)
    itself, with an empty body; give those the JSON error body every other error has."""
    import h11
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_kairos_json_errors", False):
        return

    async def send_error_response(self: H11Protocol, status_code: int) -> None:
        data = json.dumps(W.error_body(W.status_error(status_code))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close"), (b"x-content-type-options", b"nosniff"),
                   (b"cache-control", b"no-store")]
        await self._send_h11_event(h11.Response(
            status_code=status_code, headers=[*headers, *self.config.response_headers("h11")]))
        await self._send_h11_event(h11.Data(data=data))
        await self._send_h11_event(h11.EndOfMessage())

    H11Protocol._send_error_response = send_error_response  # type: ignore[method-assign]
    H11Protocol._kairos_json_errors = True  # type: ignore[attr-defined]
