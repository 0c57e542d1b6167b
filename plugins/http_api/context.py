"""What every route shares (:class:`ApiContext`) and how a route is declared.

:func:`api_route` wraps a handler ``(ctx, request, principal)`` with
authentication and the rate limit, and remembers the route's template for
metrics and logs (never the concrete path: it may hold ids, and the query may
hold a key). Kernel calls that touch the database are synchronous; handlers run
them in a worker thread with :meth:`ApiContext.call` so that the event loop,
shared with the sync daemon under ``run --listen``, never blocks.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from threadsync.core.api import Threadsync
from threadsync.core.host.apikeys import Principal
from threadsync.plugins.http_api.auth import Authenticator, RateLimiter, authenticate, require_admin
from threadsync.plugins.http_api.settings import HttpSettings
from threadsync.plugins.http_api.signins import SignIns

T = TypeVar("T")
Handler = Callable[["ApiContext", Request, Principal], Awaitable[Response]]


@dataclass
class RequestCounters:
    """HTTP request counts and total seconds per (method, route, status), for /metrics."""

    counts: dict[tuple[str, str, int], int] = field(default_factory=dict)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)

    def add(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.seconds[(method, route)] = self.seconds.get((method, route), 0.0) + seconds


@dataclass
class ApiContext:
    ts: Threadsync
    http: HttpSettings
    auth: Authenticator
    limiter: RateLimiter
    signins: SignIns = field(default_factory=SignIns)
    counters: RequestCounters = field(default_factory=RequestCounters)
    #: Called when something may have queued webhooks (wakes the dispatcher early).
    wake_webhooks: Callable[[], None] = lambda: None
    started: float = field(default_factory=time.time)

    @classmethod
    def build(cls, ts: Threadsync, http: HttpSettings) -> ApiContext:
        return cls(
            ts=ts,
            http=http,
            auth=Authenticator(ts.api_keys, http.session_hours),
            limiter=RateLimiter(
                ts.rate_limits,
                http.rate_per_second,
                http.burst,
                http.auth_failures_per_second,
                http.auth_failures_burst,
            ),
        )

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking kernel call in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(data, status_code=status, headers=headers)


def api_route(
    ctx: ApiContext, path: str, handler: Handler, methods: list[str], *, admin: bool = False
) -> Route:
    """A route that needs an API key (an admin key when ``admin``)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        principal = await authenticate(request, ctx.auth, ctx.limiter)
        if admin:
            require_admin(principal)
        return await handler(ctx, request, principal)

    endpoint.route_template = path  # type: ignore[attr-defined]
    return Route(path, endpoint, methods=methods)


def open_route(
    path: str, handler: Callable[[Request], Awaitable[Response]], methods: list[str]
) -> Route:
    """A route without an API key (health, metrics with its own check, hosted endpoints)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        return await handler(request)

    endpoint.route_template = path  # type: ignore[attr-defined]
    return Route(path, endpoint, methods=methods)
