"""Routes for operators and outside services: ``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json``, provider change notifications and the OAuth
redirect (see :mod:`plugins.http_api.hosted`).

``/healthz`` says the process serves; ``/readyz`` that the database answers at
the newest schema. ``/metrics`` needs the admin key unless ``[http]
metrics_public = true``. The notification endpoint answers from memory only,
well within Graph's 3 s (notifications) and 10 s (validation) limits: the
handler wakes the subscribed connection and the sync loop does the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from core.errors import StoreError
from plugins.http_api import bodies, metrics
from plugins.http_api.auth import authenticate, require_admin
from plugins.http_api.context import ApiContext, open_route
from plugins.http_api.hosted import Reply
from plugins.http_api.openapi import document
from plugins.http_api.problems import ApiProblem, from_kernel

NOTIFICATION_BODY_LIMIT = 1024 * 1024


def _reply(answer: Reply) -> Response:
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type)


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
        if request.method == "POST":
            raw = await bodies.read_body(request, 16 * 1024)
            params.update(parse_qsl(raw.decode("ascii", "replace")))
        for handler in ctx.hosted.oauth_callbacks:
            answer = handler(params)
            if answer is not None:
                return _reply(answer)
        raise ApiProblem(404, "no sign-in is waiting for this callback", code="not_found")

    return [
        open_route("/healthz", healthz, ["GET"]),
        open_route("/readyz", readyz, ["GET"]),
        open_route("/metrics", metrics_text, ["GET"]),
        open_route("/openapi.json", openapi, ["GET"]),
        open_route("/notifications/{provider}", notifications, ["POST"]),
        open_route("/oauth/callback", oauth_callback, ["GET", "POST"]),
    ]
