"""Request-body budget: a running byte count over the ASGI stream, chunked bodies included.

:class:`BodyLimitMiddleware` answers ``413 INPUT_TOO_LARGE`` before the body is read when
``Content-Length`` is over the limit, and counts the bytes of every body as they arrive
(a chunked upload has no Content-Length): past the limit the next ``receive()`` raises
:class:`~pipeline.errors.InputTooLargeError`, which the route's body parser lets through
(serve_app/middleware.py renders it). Starlette spools multipart file parts to disk above
1 MiB, so the ingress never holds more than the limit of one request's files in memory.
"""

from __future__ import annotations

import json
import uuid

from pipeline.errors import InputTooLargeError


def _too_large_body(message: str, details: dict, request_id: str | None) -> bytes:
    body = {
        "error": {"code": InputTooLargeError.code, "message": message, "details": details},
        "request_id": request_id,
    }
    return json.dumps(body).encode()


class BodyLimitMiddleware:
    """Pure ASGI middleware; ``limit_of(scope)`` gives the byte limit (None = unlimited)."""

    def __init__(self, app, limit_of):
        self.app = app
        self.limit_of = limit_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_of(scope)
        if not limit:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1").strip()
        if length.isdigit() and int(length) > limit:
            details = {"bytes": int(length), "limit": limit}
            rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
            body = _too_large_body(f"the request body is {length} bytes; the limit is {limit}", details, rid)
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return None
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise InputTooLargeError(
                        f"the request body passed {limit} bytes; the limit is {limit}",
                        details={"bytes": seen, "limit": limit},
                    )
            return message

        return await self.app(scope, counted_receive, send)
