"""The reference pages: `/api-docs` (Swagger UI served from the package, works offline) and
`/asyncapi.json` (the WebSocket protocol). `/api-docs.json` itself is quart-schema's route with
`web.openapi.KairosOpenAPI` behind it. None of these needs a token."""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, request, send_from_directory
from quart_schema import hide

from kairos.errors import NotFound
from web.asyncapi import asyncapi_document
from web.routes import json_response

SWAGGER_UI_VERSION = "5.35.0"
ASSETS = Path(__file__).parent / "static" / "swagger-ui"
_SERVED = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "init.js"})

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Kairos API</title>
  <link rel="stylesheet" href="/api-docs/assets/swagger-ui.css?v={SWAGGER_UI_VERSION}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api-docs/assets/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}"></script>
  <script src="/api-docs/assets/init.js?v={SWAGGER_UI_VERSION}"></script>
</body>
</html>
"""

bp = Blueprint("apidocs", __name__)


@bp.get("/api-docs")
@hide
async def api_docs_page() -> Response:
    """The interactive API reference (Swagger UI over /api-docs.json)."""
    return Response(PAGE, content_type="text/html; charset=utf-8")


@bp.get("/api-docs/assets/<name>")
@hide
async def api_docs_asset(name: str) -> Response:
    """One of the vendored Swagger UI files (versioned URLs: cached for a day)."""
    if name not in _SERVED:
        raise NotFound("Not found")
    response = await send_from_directory(ASSETS, name)
    response.cache_control.max_age = 86_400
    response.cache_control.public = True
    return response


@bp.get("/asyncapi.json")
@hide
async def asyncapi_json() -> Response:
    """The AsyncAPI 3.0 document of `/ws`, with this server as its host."""
    doc = asyncapi_document()
    doc["servers"]["kairos"]["host"] = request.host
    return json_response(doc)
