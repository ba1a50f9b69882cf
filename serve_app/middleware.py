"""The one place where error codes become HTTP statuses, plus the request-id middleware.

Every error response has one shape::

    {"error": {"code": "JOB_NOT_FOUND", "message": "...", "details": {...}}, "request_id": "..."}
"""

from __future__ import annotations

import json
import logging
import uuid
import zipfile
import zlib

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from pipeline.errors import InvalidInputError, ReconError

from .errors import QueueFullError

logger = logging.getLogger("recon3d.serve")

REQUEST_ID_HEADER = "x-request-id"

#: Code -> HTTP status. Codes not listed fall back by class: InvalidInputError -> 422, else 500.
STATUS_BY_CODE: dict[str, int] = {
    "INVALID_REQUEST": 422,
    "WEBHOOK_URL_REFUSED": 422,
    "MALFORMED_REQUEST": 400,
    "MALFORMED_INPUT": 422,
    "INPUT_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "INVALID_PATH": 400,
    "UNAUTHORIZED": 401,
    "JOB_NOT_FOUND": 404,
    "FILE_NOT_FOUND": 404,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "JOB_NOT_READY": 409,
    "JOB_ALREADY_FINISHED": 409,
    "CANCEL_CONFIRMATION_REQUIRED": 409,
    "JOB_EXPIRED": 410,
    "QUEUE_FULL": 429,
    "QUOTA_QUEUED_JOBS": 429,
    "QUOTA_STORAGE": 413,
    "MODEL_UNAVAILABLE": 503,
    "SERVICE_NOT_READY": 503,
    "INTERNAL": 500,
    # experiments and batches (serve_app/experiments, serve_app/batches.py)
    "INVALID_EXPERIMENT": 422,
    "INVALID_OVERRIDES": 422,
    "EXPERIMENT_NOT_FOUND": 404,
    "BATCH_NOT_FOUND": 404,
    "BATCH_TOO_LARGE": 413,
    "BATCH_NOT_READY": 409,
    "EXPERIMENT_EXPIRED": 410,
    "BATCH_EXPIRED": 410,
}


def status_for(err: ReconError) -> int:
    if err.code in STATUS_BY_CODE:
        return STATUS_BY_CODE[err.code]
    if isinstance(err, InvalidInputError):
        return 422
    return 500


def _serve_request_id() -> str | None:
    # Ray Serve's proxy assigns the id it echoes in its own x-request-id response header.
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:
        return None


def request_id_of(request: Request) -> str:
    return (
        getattr(request.state, "request_id", None)
        or request.headers.get(REQUEST_ID_HEADER)
        or _serve_request_id()
        or uuid.uuid4().hex
    )


def error_response(request: Request, code: str, message: str, details: dict | None, status: int, headers=None):
    rid = request_id_of(request)
    body = {"error": {"code": code, "message": message, "details": details or {}}, "request_id": rid}
    return JSONResponse(body, status_code=status, headers=headers)


class SetRequestIdMiddleware(BaseHTTPMiddleware):
    """Takes ``x-request-id`` from the request, else Serve's request id, else a uuid4.

    The Serve proxy echoes the id in the ``x-request-id`` response header; outside Serve we set it.
    """

    async def dispatch(self, request: Request, call_next):
        request.state.request_id = request_id_of(request)
        response = await call_next(request)
        if REQUEST_ID_HEADER not in response.headers and _serve_request_id() is None:
            response.headers[REQUEST_ID_HEADER] = request.state.request_id
        return response


#: Statuses Starlette/FastAPI raise themselves -> stable codes (a multipart body without a boundary is a 400).
HTTP_STATUS_CODES: dict[int, str] = {
    400: "MALFORMED_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "INPUT_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}

#: Decode and parse errors that escape a route's own checks: the one place that turns them into
#: 422 MALFORMED_INPUT instead of a 500 (each route still raises its specific code where it can).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    UnicodeError,
    RecursionError,
    OverflowError,
    json.JSONDecodeError,
    PIL.UnidentifiedImageError,
    PIL.Image.DecompressionBombError,
    EOFError,
)


def _recon_error_in(exc: BaseException | None, depth: int = 0) -> ReconError | None:
    """The ReconError ``exc`` is, or holds (exception groups, causes), if any."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, ReconError):
        return exc
    for inner in getattr(exc, "exceptions", ()) or ():
        found = _recon_error_in(inner, depth + 1)
        if found is not None:
            return found
    return _recon_error_in(exc.__cause__ or exc.__context__, depth + 1)


async def _malformed(request: Request, exc: Exception):
    logger.warning("malformed input: %s: %s", type(exc).__name__, exc, extra={"request_id": request_id_of(request)})
    return error_response(
        request,
        "MALFORMED_INPUT",
        f"the request could not be decoded ({type(exc).__name__}); check its files and JSON",
        {"error": f"{type(exc).__name__}: {exc}"[:300]},
        422,
    )


def add_exception_handling(app: FastAPI) -> None:
    """Install the request-id middleware and the handlers that render every error in one shape."""
    app.add_middleware(SetRequestIdMiddleware)

    @app.exception_handler(ReconError)
    async def _recon(request: Request, exc: ReconError):
        status = status_for(exc)
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFullError) else None
        if status >= 500:
            logger.error("request failed: %s", exc, extra={"request_id": request_id_of(request)})
        return error_response(request, exc.code, exc.message, exc.details, status, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return error_response(
            request, "INVALID_REQUEST", "the request is invalid; see details.errors", {"errors": errors}, 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        cause = exc.__cause__
        inner = _recon_error_in(cause)
        if inner is not None:  # raised while FastAPI parsed the body (e.g. the byte budget)
            return await _recon(request, inner)
        code = HTTP_STATUS_CODES.get(exc.status_code, "HTTP_ERROR")
        details = {"cause": f"{type(cause).__name__}: {cause}"[:300]} if cause is not None else {}
        return error_response(request, code, str(exc.detail), details, exc.status_code)

    for exc_cls in DECODE_ERRORS:
        app.add_exception_handler(exc_cls, _malformed)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error", extra={"request_id": request_id_of(request)})
        return error_response(request, "INTERNAL", "internal error; the request id identifies it in the logs", {}, 500)
