"""aiohttp plumbing shared by the online routes and the batch routes."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .wire import RequestError, Wire

JSON = "application/json"


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers, content_type=JSON)


def error_response(
    wire: Wire,
    request_id: str,
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The provider's error body for ``status``, with its request-id header."""
    all_headers = {wire.request_id_header: request_id}
    if headers:
        all_headers.update(headers)
    body = wire.error_body(status, message, request_id, error_type=error_type, param=param, code=code)
    return json_response(body, status=status, headers=all_headers)


def request_error_response(wire: Wire, request_id: str, exc: RequestError) -> web.Response:
    return error_response(
        wire,
        request_id,
        exc.status,
        exc.message,
        error_type=exc.error_type,
        param=exc.param,
        code=exc.code,
        headers=exc.headers,
    )


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; :class:`RequestError` (400/413) otherwise."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(413, "Request exceeds the maximum allowed size.") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    return body
