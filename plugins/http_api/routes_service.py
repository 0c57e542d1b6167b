"""Routes for operators and outside services: ``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json``, the OAuth redirect, and the endpoints plugins
contribute through the ``register_routes`` hook (Outlook's change notifications;
see :mod:`threadsync.core.host.routes`).

``/healthz`` says the process serves; ``/readyz`` that the database answers at
the newest schema. ``/oauth/callback`` finishes the sign-in named by the
redirect's ``state`` (:mod:`threadsync.core.accounts.consent`) and shows the user a short page.
``/metrics`` needs the admin key unless ``[http] metrics_public = true``. Plugin
endpoints are served without an API key, with their own body limit; a handler
that fails answers 500 without details (and is logged once).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from threadsync.core.errors import AuthenticationFailed, StoreError, ThreadsyncError
from threadsync.core.host.routes import PluginRoute, RouteRequest
from threadsync.plugins.http_api import bodies, metrics
from threadsync.plugins.http_api.auth import authenticate, require_admin
from threadsync.plugins.http_api.context import ApiContext, open_route
from threadsync.plugins.http_api.openapi import document
from threadsync.plugins.http_api.problems import ApiProblem, from_kernel, problem_status

log = logging.getLogger(__name__)


_PAGE = (
    "<!doctype html><html lang=en><meta charset=utf-8>"
    "<meta name=viewport content='width=device-width'><title>{title}</title>"
    "<body style='font:16px system-ui,sans-serif;margin:3em auto;max-width:36em'>"
    "<h1>{title}</h1><p>{text}</p><p>You can close this window.</p></body></html>"
)


def callback_page(status: int, title: str, text: str) -> Response:
    """What the user's browser shows at the end of a sign-in (no secret in it)."""
    page = _PAGE.format(title=html.escape(title), text=html.escape(text))
    return Response(
        page,
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


def plugin_route(route: PluginRoute) -> Route:
    """Serve a plugin's framework-free route through Starlette."""

    async def endpoint(request: Request) -> Response:
        body = await bodies.read_body(request, route.max_body_bytes)
        try:
            answer = await route.handler(
                RouteRequest(
                    method=request.method,
                    path=request.url.path,
                    query=dict(request.query_params),
                    headers=dict(request.headers),
                    body=body,
                )
            )
        except Exception:  # a plugin's fault must not take the API down
            log.exception("plugin route %s failed", route.path)
            raise ApiProblem(500, "the endpoint failed", code="internal") from None
        return Response(
            answer.body,
            status_code=answer.status,
            media_type=answer.content_type,
            # The body may echo what the caller sent (Graph's validationToken):
            # no browser may sniff it into HTML.
            headers={"X-Content-Type-Options": "nosniff", **dict(answer.headers)},
        )

    return open_route(route.path, endpoint, list(route.methods))


def routes(ctx: ApiContext, dispatched: Callable[[], tuple[int, int] | None]) -> list[Route]:
    spec = document()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await ctx.call(ctx.ts.check_ready)
        except StoreError as exc:
            return from_kernel(exc, request.url.path)
        return JSONResponse({"status": "ready"})

    async def metrics_text(request: Request) -> Response:
        if not ctx.http.metrics_public:
            require_admin(await authenticate(request, ctx.auth, ctx.limiter))
        text = await ctx.call(metrics.collect, ctx, dispatched())
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return JSONResponse(spec)

    async def oauth_callback(request: Request) -> Response:
        params = dict(request.query_params)
        if request.method == "POST":  # response_mode=form_post
            raw = await bodies.read_body(request, 16 * 1024)
            params.update(parse_qsl(raw.decode("ascii", "replace")))
        try:
            done = await ctx.ts.finish_sign_in(params)
        except ThreadsyncError as exc:
            # A refused sign-in is the user's answer, not a failing gateway.
            status = 403 if isinstance(exc, AuthenticationFailed) else problem_status(exc)
            return callback_page(status, "The mailbox was not connected", str(exc) or exc.code)
        connection = done.get("connection") or {}
        email = str(connection.get("email") or "the mailbox")
        return callback_page(200, "Connected", f"{email} is connected to the CRM.")

    return [
        open_route("/healthz", healthz, ["GET"]),
        open_route("/readyz", readyz, ["GET"]),
        open_route("/metrics", metrics_text, ["GET"]),
        open_route("/openapi.json", openapi, ["GET"]),
        open_route("/oauth/callback", oauth_callback, ["GET", "POST"]),
        *(plugin_route(route) for route in ctx.ts.plugin_routes()),
    ]
