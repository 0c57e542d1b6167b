"""The operator's status page at ``/``: connections per sub-account with their
state and last error, and the newest synced and skipped messages.

Server-rendered HTML with inline CSS, no scripts and no build step. Behind the
admin key: ``/login`` takes the key from a form (or ``/?key=...`` once, which
is answered with a redirect that drops it from the address bar) and sets a
signed, HttpOnly, SameSite=Strict session cookie; the key itself is never stored
in the cookie nor logged. Every value is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from threadsync.core.host.apikeys import Principal
from threadsync.core.rules import LIVE_STATES
from threadsync.plugins.http_api import bodies
from threadsync.plugins.http_api.auth import SESSION_COOKIE
from threadsync.plugins.http_api.context import ApiContext, open_route

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:16px}
header h1{font-size:18px;margin:0;flex:1}
main{padding:20px 24px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:0 0 20px;
padding:14px 16px}
h2{font-size:15px;margin:0 0 10px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
th{font-weight:600;color:#555e6e;font-size:12px;text-transform:uppercase}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.connected,.synced,.delivered{background:#dcf5e3;color:#17613a}
.needs_reauth,.error,.skipped,.dead{background:#fde2e1;color:#9b1c1c}
.disconnected,.replaced,.paused,.pending{background:#eceef2;color:#4a5261}
.summary{display:flex;gap:24px;flex-wrap:wrap}
.summary div{font-size:13px}.summary b{font-size:20px;display:block}
.err{color:#9b1c1c}.muted{color:#7a8294}
form.login{max-width:420px;margin:80px auto;background:#fff;padding:24px;border-radius:6px;
border:1px solid #dde1e7}
input[type=password]{width:100%;padding:8px;margin:8px 0 12px;box-sizing:border-box}
button{padding:7px 16px;border:0;border-radius:4px;background:#2456c7;color:#fff;cursor:pointer}
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><meta name=viewport content='width=device-width'>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _when(value: str | None) -> str:
    """``2026-01-02T03:04:05.678Z`` as ``2026-01-02 03:04:05`` (UTC)."""
    return escape(value[:19].replace("T", " ")) if value else "-"


def _badge(value: str | None) -> str:
    text = escape(value or "")
    return f"<span class='badge {text}'>{text}</span>"


def login_page(message: str | None = None, status: int = 200) -> HTMLResponse:
    note = f"<p class=err id=login-error>{escape(message)}</p>" if message else ""
    return _page(
        "threadsync - sign in",
        "<form class=login method=post action=/login id=login>"
        "<h2>threadsync operator status</h2>"
        "<label for=key>Admin API key</label>"
        "<input type=password id=key name=key autocomplete=off required>"
        f"{note}<button type=submit>Sign in</button></form>",
        status,
    )


def render(data: dict[str, Any], backlog: dict[str, Any]) -> str:
    conns = data["connections"]
    by_state: dict[str, int] = {}
    for c in conns:
        by_state[c["state"]] = by_state.get(c["state"], 0) + 1
    summary = "".join(
        f"<div><b>{n}</b>{escape(state)}</div>" for state, n in sorted(by_state.items())
    )
    counts = backlog["counts"]
    summary += (
        f"<div id=webhook-backlog><b>{counts.get('pending', 0)}</b>webhooks pending</div>"
        f"<div id=webhook-dead><b>{counts.get('dead', 0)}</b>webhooks dead</div>"
    )
    rows = []
    for c in conns:
        paused = " " + _badge("paused") if c["paused"] and c["state"] in LIVE_STATES else ""
        err = escape(c["last_error"] or "")
        rows.append(
            f"<tr class=connection data-state='{escape(c['state'])}'>"
            f"<td>{escape(c['subaccount'])}</td><td>{escape(c['user'])}</td>"
            f"<td>{escape(c['email'])}</td><td>{escape(c['provider'])}</td>"
            f"<td>{_badge(c['state'])}{paused}</td><td>{_when(c['since'])}</td>"
            f"<td>{_when(c['last_sync_at'])}</td><td class=err>{err}</td></tr>"
        )
    conn_table = (
        "<table><thead><tr><th>Sub-account</th><th>User</th><th>Mailbox</th><th>Provider</th>"
        "<th>State</th><th>Since (UTC)</th><th>Last sync</th><th>Last error</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p class=muted>No connections yet.</p>"
    )
    msgs = []
    for m in data["messages"]:
        arrow = "&larr; in" if m["direction"] == "inbound" else "&rarr; out"
        reason = f" <span class=muted>{escape(m['reason'])}</span>" if m["reason"] else ""
        msgs.append(
            f"<tr class=message data-state='{escape(m['state'])}'>"
            f"<td>{_when(m['at'])}</td><td>{escape(m['subaccount'])}</td>"
            f"<td>{escape(m['thread_id'])}</td><td>{arrow} ({escape(m['origin'])})</td>"
            f"<td>{escape(m['from'] or '')}</td><td>{escape(m['subject'] or '')}</td>"
            f"<td>{_badge(m['state'])}{reason}</td></tr>"
        )
    msg_table = (
        "<table><thead><tr><th>At</th><th>Sub-account</th><th>Thread</th><th>Direction</th>"
        "<th>From</th><th>Subject</th><th>State</th></tr></thead>"
        f"<tbody>{''.join(msgs)}</tbody></table>"
        if msgs
        else "<p class=muted>No messages yet.</p>"
    )
    return (
        "<header><h1>threadsync operator status</h1>"
        "<form method=post action=/logout><button type=submit>Sign out</button></form></header>"
        f"<main><section id=summary><h2>Overview</h2><div class=summary>{summary}</div></section>"
        f"<section id=connections><h2>Connections</h2>{conn_table}</section>"
        f"<section id=messages><h2>Recent messages</h2>{msg_table}</section></main>"
    )


def _secure(ctx: ApiContext, request: Request) -> bool:
    return request.url.scheme == "https" or ctx.http.tls or ctx.http.behind_tls_proxy


def _signed_in(ctx: ApiContext, request: Request, principal: Principal) -> Response:
    response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        SESSION_COOKIE,
        ctx.auth.session_cookie(principal),
        max_age=int(ctx.auth.session_seconds),
        httponly=True,
        samesite="strict",
        secure=_secure(ctx, request),
    )
    return response


def routes(ctx: ApiContext) -> list[Route]:
    async def admin_by_key(key: str) -> Principal | None:
        principal = await ctx.auth.key(key)
        return principal if principal is not None and principal.admin else None

    async def index(request: Request) -> Response:
        key = request.query_params.get("key")
        if key is not None:
            principal = await admin_by_key(key)
            if principal is None:
                return login_page("That is not a valid admin API key.", 401)
            return _signed_in(ctx, request, principal)
        cookie = request.cookies.get(SESSION_COOKIE)
        principal = await ctx.auth.session(cookie) if cookie else None
        if principal is None or not principal.admin:
            return login_page()
        data = await ctx.call(ctx.ts.overview)
        backlog = await ctx.call(ctx.ts.webhooks.backlog)
        page = _page("threadsync status", render(data, backlog))
        page.headers["Refresh"] = "30"
        return page

    async def login(request: Request) -> Response:
        raw = await bodies.read_body(request, 4096)
        form = parse_qs(raw.decode("utf-8", "replace"))
        principal = await admin_by_key((form.get("key") or [""])[0].strip())
        if principal is None:
            return login_page("That is not a valid admin API key.", 401)
        return _signed_in(ctx, request, principal)

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
        return response

    return [
        open_route("/", index, ["GET"]),
        open_route("/login", login, ["POST"]),
        open_route("/logout", logout, ["POST"]),
    ]
