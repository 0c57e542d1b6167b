"""Routes for CRM mail: send and reply (with ``Idempotency-Key``), threads, one
thread, one message, attachment downloads and the event log.

A thread belongs to one sub-account; a sub-account key asking for another's
thread gets 404, exactly as for a thread that does not exist (R10). Send and
reply with an ``Idempotency-Key`` are answered from the stored first answer when
retried (header ``Idempotent-Replayed: true``), so a retry never sends twice
(R9); the same key with a different body is refused (422). A retry while the
first request still runs, or after it died without an answer, goes to the
kernel with the same key: the outbox knows the key (unique), so it answers the
message the first request stored, delivering it if it still waits, or, when
nothing was stored, sends it now, once.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from threadsync.core.errors import ConfigError, InvalidInput, NotFound, Refused
from threadsync.core.host.apikeys import Principal
from threadsync.core.outbox.compose import Draft
from threadsync.core.rules import MessageState
from threadsync.plugins.http_api import bodies
from threadsync.plugins.http_api.auth import require_subaccount
from threadsync.plugins.http_api.context import ApiContext, api_route, ok
from threadsync.plugins.http_api.problems import ApiProblem

#: Kernel errors that prove nothing was stored: the idempotency key is released.
NOTHING_DONE = (InvalidInput, NotFound, Refused, ConfigError)
MAX_TEXT = 10 * 1024 * 1024


def _draft(body: dict[str, Any], *, new_thread: bool) -> Draft:
    bodies.only(body, ("to", "cc", "subject", "text", "html", "attachments"))
    to = bodies.text_list(body, "to")
    if new_thread and not to:
        raise bodies.invalid("to", "at least one recipient is needed")
    subject = bodies.text(body, "subject", required=new_thread, max_len=998, default="")
    return Draft(
        text=bodies.text(body, "text", required=True, max_len=MAX_TEXT, empty_ok=True),
        html=bodies.text(body, "html", max_len=MAX_TEXT),
        attachments=bodies.attachments(body),
        to=to,
        cc=bodies.text_list(body, "cc"),
        subject=subject,
    )


def _fingerprint(request: Request, raw: bytes) -> str:
    """What makes a request "the same" for an ``Idempotency-Key``: method, path,
    body. Taken before the work, so that the body need not be kept during it."""
    digest = hashlib.sha256(request.method.encode() + b" " + request.url.path.encode() + b"\n")
    digest.update(raw)  # not concatenated: a big body is not copied
    return digest.hexdigest()


async def _idempotent(
    ctx: ApiContext,
    request: Request,
    subaccount: str,
    fingerprint: str,
    run: Any,
) -> Response:
    """Run ``run()`` once per ``Idempotency-Key``; answer retries from the record."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return await _answer(ctx, await run(None))
    keys = ctx.ts.api_keys
    replay = await ctx.call(keys.begin, subaccount, key, fingerprint)
    if replay is not None:
        if not replay.same_request:
            raise ApiProblem(
                422,
                "this Idempotency-Key was used for a different request",
                code="idempotency_key_reused",
            )
        if replay.status_code is not None and replay.response is not None:
            return ok(replay.response, replay.status_code, {"Idempotent-Replayed": "true"})
    try:
        result = await run(key)
    except NOTHING_DONE:
        await ctx.call(keys.abandon, subaccount, key)
        raise
    await ctx.call(keys.finish, subaccount, key, 201, result)
    return await _answer(ctx, result)


async def _answer(ctx: ApiContext, result: dict[str, Any]) -> Response:
    ctx.wake_webhooks()
    return ok(result, 201, {"Location": f"/v1/threads/{quote(result['thread_id'])}"})


async def send(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = str(request.path_params["subaccount"])
    require_subaccount(who, subaccount)
    user = str(request.path_params["user"])
    body, raw = await bodies.json_object(request, ctx.http.max_body_bytes)
    draft = _draft(body, new_thread=True)
    fingerprint = _fingerprint(request, raw)
    del body, raw  # the draft holds what is needed: the JSON's big strings can go

    async def run(key: str | None) -> dict[str, Any]:
        return await ctx.ts.send(subaccount, user, draft, idempotency_key=key)

    return await _idempotent(ctx, request, subaccount, fingerprint, run)


async def reply(ctx: ApiContext, request: Request, who: Principal) -> Response:
    thread_id = str(request.path_params["thread_id"])
    body, raw = await bodies.json_object(request, ctx.http.max_body_bytes)
    draft = _draft(body, new_thread=False)
    fingerprint = _fingerprint(request, raw)
    del body, raw  # the draft holds what is needed: the JSON's big strings can go
    owner = (await ctx.call(ctx.ts.thread, thread_id, who.subaccount))["subaccount"]

    async def run(key: str | None) -> dict[str, Any]:
        return await ctx.ts.reply(thread_id, draft, idempotency_key=key)

    return await _idempotent(ctx, request, owner, fingerprint, run)


async def threads(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = str(request.path_params["subaccount"])
    require_subaccount(who, subaccount)
    return ok(await ctx.call(ctx.ts.threads, subaccount, bodies.query_text(request, "user")))


def _with_links(thread_id: str, message: dict[str, Any]) -> dict[str, Any]:
    base = f"/v1/threads/{quote(thread_id)}/messages/{quote(message['message_id'], safe='')}"
    stored = message.get("state") == MessageState.SYNCED
    message["attachments"] = [
        {**a, "index": i, "download_url": f"{base}/attachments/{i}" if stored else None}
        for i, a in enumerate(message.get("attachments") or [])
    ]
    return message


async def thread(ctx: ApiContext, request: Request, who: Principal) -> Response:
    thread_id = str(request.path_params["thread_id"])
    data = await ctx.call(ctx.ts.thread, thread_id, who.subaccount)
    data["messages"] = [_with_links(thread_id, m) for m in data["messages"]]
    return ok(data)


async def message(ctx: ApiContext, request: Request, who: Principal) -> Response:
    thread_id = str(request.path_params["thread_id"])
    message_id = str(request.path_params["message_id"])
    data = await ctx.call(ctx.ts.thread, thread_id, who.subaccount)
    for m in data["messages"]:
        if m["message_id"] == message_id:
            return ok({"thread_id": thread_id, **_with_links(thread_id, m)})
    raise NotFound(f"message {message_id!r} not found in thread {thread_id!r}")


def _disposition(filename: str | None) -> str:
    name = filename or "attachment"
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def attachment(ctx: ApiContext, request: Request, who: Principal) -> Response:
    content = await ctx.call(
        ctx.ts.attachment,
        str(request.path_params["thread_id"]),
        str(request.path_params["message_id"]),
        bodies.path_id(request, "index"),
        who.subaccount,
    )
    return Response(
        content.data,
        media_type=content.content_type if "/" in content.content_type else None,
        headers={
            "Content-Disposition": _disposition(content.filename),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
        },
    )


async def events(ctx: ApiContext, request: Request, who: Principal) -> Response:
    subaccount = str(request.path_params["subaccount"])
    require_subaccount(who, subaccount)
    after = bodies.query_int(request, "after", 0, 0, bodies.MAX_ID)
    limit = bodies.query_int(request, "limit", 100, 1, 1000)
    return ok(await ctx.call(ctx.ts.events, subaccount, after, limit))


def routes(ctx: ApiContext) -> list[Route]:
    sub = "/v1/subaccounts/{subaccount}"
    msg = "/v1/threads/{thread_id}/messages/{message_id:path}"
    return [
        api_route(ctx, sub + "/users/{user}/send", send, ["POST"]),
        api_route(ctx, "/v1/threads/{thread_id}/reply", reply, ["POST"]),
        api_route(ctx, sub + "/threads", threads, ["GET"]),
        api_route(ctx, "/v1/threads/{thread_id}", thread, ["GET"]),
        api_route(ctx, msg + "/attachments/{index:int}", attachment, ["GET"]),
        api_route(ctx, msg, message, ["GET"]),
        api_route(ctx, sub + "/events", events, ["GET"]),
    ]
