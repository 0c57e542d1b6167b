"""Routes for a sub-account's webhook endpoints and their deliveries.

Creating an endpoint answers its signing secret, once (``Cache-Control:
no-store``); it is kept encrypted (R11). A URL whose host is, or resolves to, an
internal address the operator did not allow is refused with ``422`` naming the
address and why (:func:`threadsync.core.host.webhook_targets.check_url`).
``GET .../webhook-deliveries?status=dead`` lists the dead letters, and
``POST .../webhook-deliveries/{id}/retry`` sends one again with a fresh retry
window.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from threadsync.core.errors import InvalidInput
from threadsync.core.host import webhook_targets, webhooks
from threadsync.core.host.apikeys import Principal
from threadsync.plugins.http_api import bodies
from threadsync.plugins.http_api.auth import require_subaccount
from threadsync.plugins.http_api.context import ApiContext, api_route, ok
from threadsync.plugins.http_api.dispatcher import resolve

RESOLVE_TIMEOUT_SECONDS = 5.0


async def _addresses(url: str) -> list[str]:
    """What the URL's host resolves to now, for the target rules; nothing when it
    does not resolve in time (every delivery resolves and checks again)."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname, parts.port
        if not host or parts.scheme not in ("http", "https"):
            return []
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            return await resolve(host, port or (443 if parts.scheme == "https" else 80))
    except (OSError, ValueError, TimeoutError):
        return []


def _sub(request: Request, who: Principal) -> str:
    subaccount = str(request.path_params["subaccount"])
    require_subaccount(who, subaccount)
    return subaccount


async def endpoints_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    return ok(await ctx.call(ctx.ts.webhooks.list_endpoints, _sub(request, who)))


async def endpoints_post(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    body, _ = await bodies.json_object(request, ctx.http.max_body_bytes)
    bodies.only(body, ("url", "events", "description"))
    url = bodies.text(body, "url", required=True, max_len=2048)
    events = bodies.text_list(body, "events", max_items=len(webhooks.EVENT_TYPES))
    description = bodies.text(body, "description", max_len=255, default="")
    settings = ctx.http.webhooks
    addresses = await _addresses(url)
    try:
        webhook_targets.check_url(url, settings, addresses)
    except InvalidInput as exc:
        raise bodies.invalid("url", str(exc).removeprefix("webhook url ")) from None
    made = await ctx.call(
        ctx.ts.webhooks.create_endpoint,
        subaccount,
        url,
        events,
        description,
        settings=settings,
        addresses=addresses,
    )
    location = f"/v1/subaccounts/{quote(subaccount, safe='')}/webhooks/{made['id']}"
    headers = {"Cache-Control": "no-store", "Location": location}
    return ok(made, 201, headers)


async def endpoint_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    endpoint_id = bodies.path_id(request, "endpoint_id")
    return ok(await ctx.call(ctx.ts.webhooks.get_endpoint, subaccount, endpoint_id))


async def endpoint_delete(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    endpoint_id = bodies.path_id(request, "endpoint_id")
    return ok(await ctx.call(ctx.ts.webhooks.delete_endpoint, subaccount, endpoint_id))


async def deliveries_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    status = bodies.query_text(request, "status", 16)
    if status is not None and status not in webhooks.STATUSES:
        raise bodies.invalid("status", f"must be one of {', '.join(webhooks.STATUSES)}")
    raw_endpoint = request.query_params.get("endpoint_id")
    endpoint_id = (
        bodies.query_int(request, "endpoint_id", 0, 1, bodies.MAX_ID)
        if raw_endpoint is not None
        else None
    )
    result = await ctx.call(
        ctx.ts.webhooks.list_deliveries,
        subaccount,
        status=status,
        endpoint_id=endpoint_id,
        after=bodies.query_int(request, "after", 0, 0, bodies.MAX_ID),
        limit=bodies.query_int(request, "limit", 100, 1, 1000),
    )
    return ok(result)


async def delivery_retry(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    delivery_id = bodies.path_id(request, "delivery_id")
    result = await ctx.call(ctx.ts.webhooks.retry_delivery, subaccount, delivery_id)
    ctx.wake_webhooks()
    return ok(result)


def routes(ctx: ApiContext) -> list[Route]:
    base = "/v1/subaccounts/{subaccount}"
    return [
        api_route(ctx, base + "/webhooks", endpoints_get, ["GET"]),
        api_route(ctx, base + "/webhooks", endpoints_post, ["POST"]),
        api_route(ctx, base + "/webhooks/{endpoint_id:int}", endpoint_get, ["GET"]),
        api_route(ctx, base + "/webhooks/{endpoint_id:int}", endpoint_delete, ["DELETE"]),
        api_route(ctx, base + "/webhook-deliveries", deliveries_get, ["GET"]),
        api_route(
            ctx, base + "/webhook-deliveries/{delivery_id:int}/retry", delivery_retry, ["POST"]
        ),
    ]
