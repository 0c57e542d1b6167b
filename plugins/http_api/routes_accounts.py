"""Routes for sub-accounts and connections: the Labs flag (R1), connect,
update-email, disconnect and status (R2, R6, R7), interactive sign-ins, and the
admin's API keys.

Mailbox secrets come in the body's ``credentials`` object (``{"password": ...}``
for ``imap_smtp``), never as ``*_env`` options: over HTTP a caller must not name
the server's environment variables. They reach the kernel as the ``credentials``
parameter of connect; nothing of the body is logged (R11).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from threadsync.core.errors import NotFound, ThreadsyncError
from threadsync.core.host.apikeys import Principal
from threadsync.core.provider import ProviderOption
from threadsync.plugins.http_api import bodies
from threadsync.plugins.http_api.auth import require_admin, require_subaccount
from threadsync.plugins.http_api.context import ApiContext, api_route, ok
from threadsync.plugins.http_api.problems import ApiProblem, from_kernel

#: Options only an operator may set: they name files on the server.
ADMIN_OPTIONS = {"ca_file"}


def _sub(request: Request, who: Principal) -> str:
    subaccount = str(request.path_params["subaccount"])
    require_subaccount(who, subaccount)
    return subaccount


async def labs_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    return ok(await ctx.call(ctx.ts.labs_status, _sub(request, who)))


async def labs_put(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    require_admin(who)
    body, _ = await bodies.json_object(request, ctx.http.max_body_bytes)
    bodies.only(body, ("two_way_email_sync",))
    enabled = bodies.flag(body, "two_way_email_sync", required=True)
    return ok(await ctx.call(ctx.ts.labs, subaccount, enabled=bool(enabled)))


async def connections_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    user = bodies.query_text(request, "user")
    return ok(await ctx.call(ctx.ts.status, subaccount, user))


async def connection_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    return ok(await ctx.call(ctx.ts.status, subaccount, str(request.path_params["user"])))


def _connect_request(
    ctx: ApiContext, body: dict[str, Any], who: Principal
) -> tuple[str, str, dict[str, Any], dict[str, str]]:
    bodies.only(body, ("provider", "email", "options", "credentials"))
    provider = bodies.text(body, "provider", required=True, max_len=64)
    email = bodies.text(body, "email", required=True, max_len=320)
    options = body.get("options") or {}
    credentials = body.get("credentials") or {}
    if not isinstance(options, dict):
        raise bodies.invalid("options", "must be an object")
    if not isinstance(credentials, dict) or not all(
        isinstance(v, str) for v in credentials.values()
    ):
        raise bodies.invalid("credentials", "must be an object of strings")
    specs: dict[str, ProviderOption] = {
        o.name: o for o in ctx.ts.provider_options(provider)
    }
    secret_names = {n.removesuffix("_env"): n for n, o in specs.items() if o.secret_env}
    for name, value in options.items():
        spec = specs.get(name)
        if spec is None or spec.secret_env:
            known = ", ".join(sorted(n for n, o in specs.items() if not o.secret_env))
            why = "put secrets in credentials" if spec is not None else f"known: {known}"
            raise bodies.invalid(f"options.{name}", f"not an option of {provider} ({why})")
        if name in ADMIN_OPTIONS and not who.admin:
            raise bodies.invalid(f"options.{name}", "only an admin key may set this option")
        if not isinstance(value, str | int | bool):
            raise bodies.invalid(f"options.{name}", "must be a string, number or boolean")
    for name in credentials:
        if name not in secret_names:
            known = ", ".join(sorted(secret_names)) or "none"
            raise bodies.invalid(f"credentials.{name}", f"not a credential of {provider} ({known})")
    return provider, email, dict(options), {str(k): str(v) for k, v in credentials.items()}


def redirect_uri(ctx: ApiContext, request: Request) -> str:
    """Where the browser comes back after consent: ``[http] public_url`` or this
    request's own address, plus ``/oauth/callback``."""
    base = ctx.http.public_url or str(request.base_url).rstrip("/")
    return base + "/oauth/callback"


async def _connect(ctx: ApiContext, request: Request, who: Principal, update: bool) -> Response:
    subaccount = _sub(request, who)
    user = str(request.path_params["user"])
    body, _ = await bodies.json_object(request, ctx.http.max_body_bytes)
    provider, email, options, credentials = _connect_request(ctx, body, who)
    ts = ctx.ts
    # Hosts named with a sub-account's key are held to the network policy
    # (threadsync.core.network); an admin key speaks for the operator.
    tenant = not who.admin
    # A sign-in the browser finishes at /oauth/callback (Outlook's consent): kept
    # in the database, so it survives a restart and any process ends it.
    pending = await ts.begin_sign_in(
        subaccount, user, provider, email=email, options=options,
        redirect_uri=redirect_uri(ctx, request), update=update,
        credentials=credentials,
    )  # fmt: skip
    if pending is not None:
        return ok(pending, 202, {"Location": _sign_in_path(subaccount, pending["id"])})
    call = ts.update_email if update else ts.connect

    async def run(notify: Any) -> dict[str, Any]:
        return await call(
            subaccount, user, provider, email=email, options=options, notify=notify,
            credentials=credentials, tenant=tenant,
        )  # fmt: skip

    def problem_of(exc: ThreadsyncError) -> dict[str, Any]:
        return dict(json.loads(bytes(from_kernel(exc).body)))

    started = await ctx.signins.start(subaccount, user, run, problem_of)
    if started.pending is not None:
        location = _sign_in_path(subaccount, started.pending.id)
        return ok(started.pending.json(), 202, {"Location": location})
    return ok(started.connection, 200 if update else 201)


def _sign_in_path(subaccount: str, sign_in_id: str) -> str:
    return f"/v1/subaccounts/{quote(subaccount, safe='')}/sign-ins/{quote(sign_in_id, safe='')}"


async def connect(ctx: ApiContext, request: Request, who: Principal) -> Response:
    return await _connect(ctx, request, who, update=False)


async def update_email(ctx: ApiContext, request: Request, who: Principal) -> Response:
    return await _connect(ctx, request, who, update=True)


async def disconnect(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    return ok(await ctx.ts.disconnect(subaccount, str(request.path_params["user"])))


async def sign_in_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = _sub(request, who)
    sign_in_id = str(request.path_params["sign_in_id"])
    item = ctx.signins.get(subaccount, sign_in_id)
    if item is not None:  # a device-code sign-in, running in this process
        return ok(item.json())
    try:
        return ok(await ctx.call(ctx.ts.sign_in, subaccount, sign_in_id))
    except NotFound:
        raise ApiProblem(
            404, "sign-in not found (finished sign-ins are kept for a day)", code="not_found"
        ) from None


# ---- API keys (admin) ----------------------------------------------------------------------


async def keys_get(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = bodies.query_text(request, "subaccount")
    return ok(await ctx.call(ctx.ts.api_keys.list_keys, subaccount))


async def keys_post(ctx: ApiContext, request: Request, who: Principal) -> Response:
    body, _ = await bodies.json_object(request, ctx.http.max_body_bytes)
    bodies.only(body, ("subaccount", "admin", "label"))
    subaccount = bodies.text(body, "subaccount", max_len=255)
    admin = bool(bodies.flag(body, "admin"))
    if admin == (subaccount is not None):
        raise bodies.invalid("subaccount", "give a subaccount, or admin: true (not both)")
    label = bodies.text(body, "label", max_len=255, default="")
    made = await ctx.call(ctx.ts.api_keys.create, subaccount, label)
    return ok(made, 201, {"Cache-Control": "no-store"})


async def key_delete(ctx: ApiContext, request: Request, who: Principal) -> Response:
    result = await ctx.call(ctx.ts.api_keys.revoke, str(request.path_params["key_id"]))
    ctx.auth.forget()
    return ok(result)


def routes(ctx: ApiContext) -> list[Route]:
    sub = "/v1/subaccounts/{subaccount}"
    user = sub + "/users/{user}/connection"
    return [
        api_route(ctx, sub + "/labs", labs_get, ["GET"]),
        api_route(ctx, sub + "/labs", labs_put, ["PUT"]),
        api_route(ctx, sub + "/connections", connections_get, ["GET"]),
        api_route(ctx, user, connection_get, ["GET"]),
        api_route(ctx, user, connect, ["POST"]),
        api_route(ctx, user, update_email, ["PUT"]),
        api_route(ctx, user, disconnect, ["DELETE"]),
        api_route(ctx, sub + "/sign-ins/{sign_in_id}", sign_in_get, ["GET"]),
        api_route(ctx, "/v1/api-keys", keys_get, ["GET"], admin=True),
        api_route(ctx, "/v1/api-keys", keys_post, ["POST"], admin=True),
        api_route(ctx, "/v1/api-keys/{key_id}", key_delete, ["DELETE"], admin=True),
    ]
