"""Routes for operators and outside services: ``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json``, provider change notifications and the OAuth
redirect (see :mod:`threadsync.plugins.http_api.hosted`).

``/healthz`` says the process serves; ``/readyz`` that the database answers at
the newest schema. ``/oauth/callback`` finishes the sign-in named by the
redirect's ``state`` (:mod:`threadsync.core.accounts.consent`) and shows the user a short page.
``/metrics`` needs the admin key unless ``[http] metrics_public = true``. The
notification endpoint answers from memory only, well within Graph's 3 s
(notifications) and 10 s (validation) limits: the handler wakes the subscribed
connection and the sync loop does the rest.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from threadsync.core.errors import AuthenticationFailed, StoreError, ThreadsyncError
from threadsync.plugins.http_api import bodies, metrics
from threadsync.plugins.http_api.auth import authenticate, require_admin
from threadsync.plugins.http_api.context import ApiContext, open_route
from threadsync.plugins.http_api.hosted import Reply
from threadsync.plugins.http_api.openapi import document
from threadsync.plugins.http_api.problems import ApiProblem, from_kernel, problem_status

NOTIFICATION_BODY_LIMIT = 1024 * 1024


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


def _reply(answer: Reply) -> Response:
    # The body may echo what the caller sent (Graph's validationToken): never let a
    # browser sniff it into HTML.
    return Response(
        answer.body,
        status_code=answer.status,
        media_type=answer.content_type,
        headers={"X-Content-Type-Options": "nosniff"},
    )


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

    async def notifications(request: Request) -> Response:
        handler = ctx.hosted.notifications.get(str(request.path_params["provider"]))
        if handler is None:
            raise ApiProblem(404, "no notification handler for this provider", code="not_found")
        body = await bodies.read_body(request, NOTIFICATION_BODY_LIMIT)
        return _reply(handler(body, dict(request.query_params)))

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
        open_route("/notifications/{provider}", notifications, ["POST"]),
        open_route("/oauth/callback", oauth_callback, ["GET", "POST"]),
    ]
