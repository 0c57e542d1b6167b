"""The ASGI application: routes, the guard middleware and error handlers.

Starlette (on uvicorn) rather than FastAPI: the API needs routing, requests and
responses, not a validation framework with pydantic; bodies are checked by hand
in :mod:`threadsync.plugins.http_api.bodies` against the same rules as the hand-written
OpenAPI document. Two small dependencies instead of five.

:class:`Guard` wraps every request: it refuses NUL bytes in paths and queries,
turns an unexpected exception into a bare 500 problem (logged with its
traceback, never the body), adds ``Cache-Control: no-store`` to API answers,
counts requests per route template for ``/metrics`` and logs one line per
request with the template, status and duration (never the path's ids or the
query, which may hold a key).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadsync.core.api import Threadsync
from threadsync.plugins.http_api import (
    routes_accounts,
    routes_mail,
    routes_service,
    routes_webhooks,
    statuspage,
)
from threadsync.plugins.http_api.context import ApiContext
from threadsync.plugins.http_api.limits import Budget, RequestLimits, release_large_buffers
from threadsync.plugins.http_api.problems import HANDLERS, problem, unexpected
from threadsync.plugins.http_api.settings import HttpSettings

log = logging.getLogger("threadsync.http")


class Guard:
    def __init__(self, app: ASGIApp, ctx: ApiContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope["method"])
        if "\x00" in scope["path"]:
            await problem(404, "not_found", "no such path")(scope, receive, send)
            return
        if b"%00" in scope.get("query_string", b"").lower():
            await problem(422, "invalid_input", "the query must not hold NUL bytes")(
                scope, receive, send
            )
            return
        started = time.perf_counter()
        status = 500
        api = scope["path"].startswith("/v1/")

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                if api and not any(name.lower() == b"cache-control" for name, _ in headers):
                    message["headers"] = [*headers, (b"cache-control", b"no-store")]
            await send(message)

        response_started = False

        async def tracking(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await sending(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            route = _template(scope)
            if response_started:
                log.error("error after the answer began in %s %s", method, route, exc_info=exc)
            else:
                await unexpected(method, route, exc)(scope, receive, sending)
        finally:
            route = _template(scope)
            seconds = time.perf_counter() - started
            self.ctx.counters.add(method, route, status, seconds)
            log.info(
                "%s %s %d %.1f ms",
                method,
                route,
                status,
                seconds * 1000,
                extra={"route": route, "status": status},
            )


def _template(scope: Scope) -> str:
    endpoint = scope.get("endpoint")
    return str(getattr(endpoint, "route_template", "(unmatched)"))


def create_app(
    ts: Threadsync,
    http: HttpSettings,
    *,
    wake_webhooks: Callable[[], None] | None = None,
    dispatched: Callable[[], tuple[int, int] | None] = lambda: None,
) -> tuple[Starlette, ApiContext]:
    """The app over ``ts``. ``wake_webhooks`` nudges a webhook dispatcher of this
    process; ``dispatched`` reports its (delivered, failed) counts for metrics."""
    release_large_buffers()
    ctx = ApiContext.build(ts, http)
    if wake_webhooks is not None:
        ctx.wake_webhooks = wake_webhooks

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {}
        finally:
            await ctx.signins.close()
            # Mailbox sessions the kernel kept open for sends made on this loop.
            await ts.close_sessions()

    routes = [
        *routes_accounts.routes(ctx),
        *routes_mail.routes(ctx),
        *routes_webhooks.routes(ctx),
        *routes_service.routes(ctx, dispatched),
        *statuspage.routes(ctx),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(Guard, ctx=ctx),
            Middleware(
                RequestLimits,
                budget=Budget(http.max_concurrent_requests, http.max_inflight_body_bytes),
                max_body_bytes=http.max_body_bytes,
            ),
        ],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
    return app, ctx
