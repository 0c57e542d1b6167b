"""Errors as RFC 9457 problem details (``application/problem+json``).

The kernel's exception tree (:mod:`threadsync.core.errors`) is translated here, at the HTTP
boundary, and nowhere else: each class has one status code and a stable
``type`` URI (``urn:threadsync:problem:<code>``). ``detail`` is the kernel's
message, which never carries a secret (R11); unexpected errors are logged with
their traceback and answered with a bare 500 that says nothing of the inside.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from threadsync.core.errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidInput,
    LabsDisabled,
    MessageParseError,
    NotFound,
    ProviderError,
    Refused,
    StoreError,
    ThreadsyncError,
    TransientProviderError,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

#: Most specific first: the first class an error is an instance of decides.
STATUS_OF: list[tuple[type[ThreadsyncError], int, str]] = [
    (LabsDisabled, 403, "Labs feature disabled"),
    (Refused, 409, "Refused by a rule"),
    (NotFound, 404, "Not found"),
    (InvalidInput, 422, "Invalid input"),
    (MessageParseError, 422, "Unparseable message"),
    (ConfigError, 400, "Bad configuration or provider option"),
    (AuthenticationFailed, 502, "Mailbox rejected the credentials"),
    (ProviderError, 502, "Mailbox provider failed"),
    (StoreError, 503, "Database unavailable"),
    (ThreadsyncError, 500, "Internal error"),
]

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


class ApiProblem(Exception):
    """Raised by route code for an answer that is not a kernel error (401, 413...)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or _TITLES.get(status, "error").lower().replace(" ", "_")
        self.headers = headers or {}
        self.errors = errors


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": f"urn:threadsync:problem:{code}",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance is not None:
        body["instance"] = instance
    if extra:
        body.update(extra)
    return Response(json.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_status(exc: ThreadsyncError) -> int:
    """The HTTP status of a kernel error."""
    return next(s for cls, s, _ in STATUS_OF if isinstance(exc, cls))


def from_kernel(exc: ThreadsyncError, instance: str | None = None) -> Response:
    """The problem response for a kernel error."""
    status, title = next((s, t) for cls, s, t in STATUS_OF if isinstance(exc, cls))
    headers: dict[str, str] = {}
    if isinstance(exc, TransientProviderError) and exc.retry_after:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if status == 503:
        headers["Retry-After"] = "5"
    detail = str(exc) or title
    if status >= 500 and not isinstance(exc, ProviderError | StoreError):
        log.error("internal error %s: %s", exc.__class__.__name__, exc)
        detail = "an internal error occurred"
    return problem(status, exc.code, detail, title=title, instance=instance, headers=headers)


async def on_threadsync_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ThreadsyncError)
    return from_kernel(exc, request.url.path)


async def on_api_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    extra = {"errors": exc.errors} if exc.errors else None
    return problem(
        exc.status,
        exc.code,
        exc.detail,
        instance=request.url.path,
        headers=exc.headers,
        extra=extra,
    )


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 as problems too."""
    assert isinstance(exc, HTTPException)
    code = _TITLES.get(exc.status_code, "error").lower().replace(" ", "_")
    return problem(
        exc.status_code,
        code,
        str(exc.detail),
        instance=request.url.path,
        headers=dict(exc.headers or {}),
    )


def unexpected(method: str, route: str, exc: BaseException) -> Response:
    """The last line: a bug. Logged with its traceback (no request body), answered 500."""
    log.error("unhandled error in %s %s", method, route, exc_info=exc)
    return problem(500, "internal_error", "an internal error occurred")


HANDLERS: dict[Any, Any] = {
    ThreadsyncError: on_threadsync_error,
    ApiProblem: on_api_problem,
    HTTPException: on_http_exception,
}
