"""How much work the API takes on at once, besides the request rate per key:
at most ``[http] max_concurrent_requests`` requests in progress, and at most
``[http] max_inflight_body_bytes`` bytes of request bodies being received or
worked on. A request over either limit is answered at once with ``503`` and
``Retry-After: 1`` rather than queued, so that the process's memory stays
bounded whatever the clients do: a maximum-size send holds a few copies of its
body for a while (the JSON, the decoded attachments, the built message), so the
default budget (32 MiB) lets one of them run at a time beside small requests;
the others are told to come back a second later.

A body's size is what its ``Content-Length`` declares; a body without one
(chunked) counts as ``max_body_bytes``, the most it may be. Bodies are still
read only up to ``max_body_bytes`` (:mod:`threadsync.plugins.http_api.bodies`).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from threadsync.plugins.http_api.problems import problem

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: glibc's ``M_MMAP_THRESHOLD`` parameter of ``mallopt``.
_M_MMAP_THRESHOLD = -3


def release_large_buffers() -> None:
    """Have glibc serve every allocation of 128 KiB or more by ``mmap``, given back
    to the system as soon as it is freed. By default glibc raises that threshold
    up to 32 MiB after the first large free, and from then on request bodies and
    built messages come from heap arenas (one per worker thread) that seldom
    shrink: the process would keep each thread's peak for good. Elsewhere than
    glibc (musl, macOS) nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


@dataclass
class Budget:
    """Requests and body bytes in progress in this process."""

    max_requests: int
    max_bytes: int
    requests: int = 0
    bytes: int = 0

    def take(self, size: int) -> str | None:
        """Count a request of ``size`` body bytes in, or say why not."""
        if self.requests >= self.max_requests:
            return f"more than {self.max_requests} requests in progress; try again"
        if size and self.bytes + size > self.max_bytes:
            return "too many request bytes in progress; try again"
        self.requests += 1
        self.bytes += size
        return None

    def give(self, size: int) -> None:
        self.requests -= 1
        self.bytes -= size


class RequestLimits:
    """ASGI middleware enforcing a :class:`Budget` (one per application)."""

    def __init__(self, app: ASGIApp, budget: Budget, max_body_bytes: int) -> None:
        self.app = app
        self.budget = budget
        self.max_body_bytes = max_body_bytes

    def _size(self, scope: Scope) -> int:
        if str(scope.get("method", "")) not in _BODY_METHODS:
            return 0
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                declared = value.decode("latin-1").strip()
                if declared.isdigit():
                    # Larger bodies are refused (413) before they are read.
                    return min(int(declared), self.max_body_bytes)
        return self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = self._size(scope)
        refusal = self.budget.take(size)
        if refusal is not None:
            busy = problem(503, "busy", refusal, headers={"Retry-After": "1"})
            await busy(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.budget.give(size)
