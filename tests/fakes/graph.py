"""A stateful fake of Microsoft Graph's mail API (v1.0), for one fake tenant.

The request pipeline does what Graph does before any handler runs: bearer-token
check against :class:`~tests.fakes.identity.FakeIdentity` (401
``InvalidAuthenticationToken``), ``Prefer`` parsing (``IdType="ImmutableId"``
chooses immutable ids, ``odata.maxpagesize`` the page size; malformed values are
refused), the 4 MB request cap (413), at most 4 concurrent requests per mailbox
(429 ``MailboxConcurrency``), injected throttling (429/503 with ``Retry-After``)
and a log of every request, with the message whose body or attachments it read.

Reading is here (``/me``, folders, delta with ``@removed`` and ``410 Gone``,
message lists with ``$filter=internetMessageId eq``, messages with ``$select``
and ``$expand=singleValueExtendedProperties``, ``$value``) and ``$batch``;
writing is in :mod:`tests.fakes.graph_write`, subscriptions in
:mod:`tests.fakes.subscriptions`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.fakes.identity import FakeIdentity
from tests.fakes.mailstore import FakeMailbox, FakeMessage
from tests.fakes.server import Call, Reply, Router

REQUEST_CAP = 4 * 1024 * 1024
MAILBOX_CONCURRENCY = 4
ID = r"([^/]+)"


@dataclass
class Logged:
    """One request Graph received (an item of a ``$batch`` is one too)."""

    method: str
    path: str
    query: dict[str, str]
    mailbox: str | None
    status: int
    in_batch: bool
    #: Immutable id of the message whose body/attachments this request read.
    body_of: str | None = None


@dataclass
class Throttle:
    remaining: int
    status: int
    retry_after: float | None
    match: Callable[[Call], bool]


def parse_prefer(values: list[str]) -> dict[str, str] | str:
    """Preferences (RFC 7240) from ``Prefer`` headers; a string is an error."""
    found: dict[str, str] = {}
    for value in values:
        for part in re.findall(r'(?:[^,"]|"[^"]*")+', value):
            name, _, raw = part.strip().partition("=")
            if not name:
                continue
            found[name.strip().lower()] = raw.strip()
    id_type = found.get("idtype")
    if id_type is not None and id_type not in ('"ImmutableId"', '"RestId"'):
        return f"Invalid IdType preference {id_type}"
    size = found.get("odata.maxpagesize")
    if size is not None and not size.isdigit():
        return f"Invalid odata.maxpagesize preference {size}"
    return found


def normalise(path: str) -> str:
    """``mailFolders('inbox')`` -> ``mailFolders/inbox``; ``delta()`` -> ``delta``."""
    path = re.sub(r"\('([^']*)'\)", r"/\1", path)
    return re.sub(r"/delta\(\)", "/delta", path)


class FakeGraph:
    """Mailboxes, the pipeline, and the read endpoints."""

    def __init__(self, identity: FakeIdentity) -> None:
        self.identity = identity
        self.lock: threading.RLock = identity.lock
        self.base = ""
        self.mailboxes: dict[str, FakeMailbox] = {}
        self.log: list[Logged] = []
        self.throttles: list[Throttle] = []
        self.lost_answers: list[Throttle] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.latency = 0.0
        self.prefer_missing = 0
        #: Simulate Exchange replacing the Message-ID of MIME drafts.
        self.rewrite_message_ids = False
        self.router = Router()
        self.on_created: Callable[[FakeMailbox, FakeMessage], None] = lambda box, msg: None
        self._read_routes(self.router)

    # ---- test controls --------------------------------------------------------------------

    def mailbox(self, email: str) -> FakeMailbox:
        return self.mailboxes[email.lower()]

    def throttle(self, count: int, *, status: int = 429, retry_after: float | None = 1,
                 when: Callable[[Call], bool] = lambda call: True) -> None:
        """The next ``count`` matching requests are refused with ``status``."""
        with self.lock:
            self.throttles.append(Throttle(count, status, retry_after, when))

    def lose_answer(self, count: int, when: Callable[[Call], bool]) -> None:
        """The next ``count`` matching requests are carried out, but the client
        gets ``504 Gateway Timeout`` instead of the answer."""
        with self.lock:
            self.lost_answers.append(Throttle(count, 504, None, when))

    def expire_delta_tokens(self, email: str, folder: str) -> None:
        """Graph forgets the folder's sync state: old delta links answer 410."""
        with self.lock:
            self.mailbox(email).folders[folder].epoch += 1

    def bodies_read(self) -> set[str]:
        return {e.body_of for e in self.log if e.body_of}

    # ---- the pipeline ---------------------------------------------------------------------

    async def handle(self, call: Call) -> Reply:
        call.path = normalise(call.path)
        if not call.path.lower().startswith("/v1.0/"):
            return Reply.graph_error(400, "BadRequest", "Invalid version")
        call.path = call.path[len("/v1.0"):]
        grant = self.identity.graph_grant(
            call.headers.get("authorization", "").removeprefix("Bearer ")
        )
        if grant is None:
            self._record(call, None, 401)
            return Reply.graph_error(
                401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid.",
                **{"www-authenticate": 'Bearer realm="", error="invalid_token"'},
            )
        mailbox = grant.user.email.lower()
        if call.path.lower() == "/$batch":
            return await self._batch(call, mailbox)
        with self.lock:
            self.in_flight[mailbox] += 1
            self.max_in_flight[mailbox] = max(self.max_in_flight[mailbox],
                                              self.in_flight[mailbox])
            busy = self.in_flight[mailbox] > MAILBOX_CONCURRENCY
        try:
            if busy:
                reply = Reply.graph_error(429, "ApplicationThrottled",
                                          "Application is over its MailboxConcurrency limit.",
                                          **{"retry-after": "1"})
                self._record(call, mailbox, 429)
                return reply
            if self.latency:
                await asyncio.sleep(self.latency)
            return await self.serve(call, mailbox)
        finally:
            with self.lock:
                self.in_flight[mailbox] -= 1

    async def serve(self, call: Call, mailbox: str) -> Reply:
        """Everything after authentication; also runs each ``$batch`` item."""
        prefer = parse_prefer(call.header_lists.get("prefer", []))
        if isinstance(prefer, str):
            self._record(call, mailbox, 400)
            return Reply.graph_error(400, "BadRequest", prefer)
        if "idtype" not in prefer:
            self.prefer_missing += 1
        call.ctx.update(mailbox=mailbox, prefer=prefer,
                        immutable=prefer.get("idtype") == '"ImmutableId"')
        throttled = self._throttled(call)
        if throttled is not None:
            self._record(call, mailbox, throttled.status)
            return throttled
        if call.method in ("POST", "PATCH", "PUT") and len(call.body) > REQUEST_CAP:
            self._record(call, mailbox, 413)
            return Reply.graph_error(413, "ErrorRequestEntityTooLarge",
                                     "The request exceeds the maximum allowed size (4 MB).")
        reply = await self.router.dispatch(call)
        self._record(call, mailbox, reply.status)
        with self.lock:
            for rule in self.lost_answers:
                if rule.remaining > 0 and reply.status < 300 and rule.match(call):
                    rule.remaining -= 1
                    return Reply.graph_error(504, "GatewayTimeout", "The gateway timed out.")
        return reply

    def _throttled(self, call: Call) -> Reply | None:
        with self.lock:
            for rule in self.throttles:
                if rule.remaining > 0 and rule.match(call):
                    rule.remaining -= 1
                    headers = {} if rule.retry_after is None else {
                        "retry-after": f"{rule.retry_after:g}"}
                    code = "TooManyRequests" if rule.status == 429 else "ServiceUnavailable"
                    return Reply.graph_error(rule.status, code,
                                             "Too many requests; try again later.", **headers)
        return None

    def _record(self, call: Call, mailbox: str | None, status: int) -> None:
        with self.lock:
            self.log.append(Logged(call.method, call.path, dict(call.query), mailbox, status,
                                   call.in_batch, call.ctx.get("body_of")))

    async def _batch(self, call: Call, mailbox: str) -> Reply:
        try:
            items = call.json()["requests"]
            assert isinstance(items, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            return Reply.graph_error(400, "BadRequest", "Invalid batch payload.")
        if len(items) > 20:
            return Reply.graph_error(400, "BadRequest",
                                     "Number of batch requests exceeds the limit of 20.")
        self._record(call, mailbox, 200)
        answers = []
        for item in items:
            url = urlsplit(str(item.get("url", "")))
            headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
            body = item.get("body")
            sub = Call(
                method=str(item.get("method", "GET")).upper(),
                path=normalise(unquote(url.path if url.path.startswith("/") else "/" + url.path)),
                query=dict(parse_qsl(url.query, keep_blank_values=True)),
                headers=headers,
                body=json.dumps(body).encode() if body is not None else b"",
                header_lists={k: [v] for k, v in headers.items()},
                in_batch=True,
            )
            if sub.path.lower().startswith("/v1.0/"):
                reply = Reply.graph_error(400, "BadRequest", "Batch URLs are relative to v1.0.")
            else:
                reply = await self.serve(sub, mailbox)
            answers.append({
                "id": item.get("id"),
                "status": reply.status,
                "headers": {k: v for k, v in reply.headers.items() if k != "content-type"},
                "body": reply.data() if reply.headers.get("content-type", "").startswith(
                    "application/json") else None,
            })
        return Reply.json(200, {"responses": answers})

    # ---- reading --------------------------------------------------------------------------

    def _read_routes(self, r: Router) -> None:
        r.add("GET", r"/me", self.me)
        r.add("GET", r"/me/mailFolders/" + ID, self.folder)
        r.add("GET", r"/me/mailFolders/" + ID + r"/messages/delta", self.delta)
        r.add("GET", r"/me/mailFolders/" + ID + r"/messages", self.list_messages)
        r.add("GET", r"/me/messages/" + ID, self.get_message)
        r.add("GET", r"/me/messages/" + ID + r"/\$value", self.get_mime)

    async def me(self, call: Call) -> Reply:
        user = self.identity.user(call.ctx["mailbox"])
        full = {"id": user.oid, "mail": user.email, "userPrincipalName": user.upn,
                "displayName": user.display_name, "proxyAddresses": user.proxy_addresses}
        return Reply.json(200, _selected(full, call.query))

    async def folder(self, call: Call, name: str) -> Reply:
        box = self.mailbox(call.ctx["mailbox"])
        if name.lower() not in box.folders:
            return Reply.graph_error(404, "ErrorItemNotFound", "The specified folder could "
                                     "not be found in the store.")
        return Reply.json(200, _selected(
            {"id": f"AQMkAD-{name.lower()}", "displayName": name.title()}, call.query))

    def _message(self, call: Call, ref: str) -> FakeMessage | Reply:
        msg = self.mailbox(call.ctx["mailbox"]).find(ref)
        if msg is None:
            return Reply.graph_error(404, "ErrorItemNotFound",
                                     "The specified object was not found in the store.")
        return msg

    def message_json(self, call: Call, msg: FakeMessage, props: list[str] | None = None,
                     select: set[str] | None = None) -> dict[str, Any]:
        if select is None and "$select" in call.query:
            select = {s.strip().lower() for s in call.query["$select"].split(",")}
        if select is None or select & {"body", "uniquebody", "bodypreview"}:
            call.ctx["body_of"] = msg.id
        return msg.json(select, call.ctx["mailbox"], call.ctx["immutable"], props)

    async def get_message(self, call: Call, ref: str) -> Reply:
        with self.lock:
            msg = self._message(call, ref)
            if isinstance(msg, Reply):
                return msg
            props = None
            expand = call.query.get("$expand", "")
            if expand:
                if not expand.lower().startswith("singlevalueextendedproperties"):
                    return Reply.graph_error(400, "BadRequest", f"Unsupported $expand {expand}")
                props = re.findall(r"id eq '([^']+)'", expand)
            return Reply.json(200, self.message_json(call, msg, props))

    async def get_mime(self, call: Call, ref: str) -> Reply:
        with self.lock:
            msg = self._message(call, ref)
            if isinstance(msg, Reply):
                return msg
            call.ctx["body_of"] = msg.id
            return Reply.text(200, msg.raw())

    async def list_messages(self, call: Call, folder: str) -> Reply:
        with self.lock:
            box = self.mailbox(call.ctx["mailbox"])
            messages = box.in_folder(folder.lower())
            wanted = call.query.get("$filter")
            if wanted:
                match = re.fullmatch(r"\s*internetMessageId eq '((?:[^']|'')*)'\s*", wanted,
                                     re.IGNORECASE)
                if match is None:
                    return Reply.graph_error(400, "ErrorInvalidUrlQueryFilter",
                                             "The query filter contains one or more invalid "
                                             "nodes.")
                value = match.group(1).replace("''", "'")
                messages = [m for m in messages if m.internet_message_id == value]
            top = int(call.query.get("$top", "10"))
            return Reply.json(200, {"value": [self.message_json(call, m)
                                              for m in messages[:top]]})

    # ---- delta ----------------------------------------------------------------------------

    def _token(self, state: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")

    def _link(self, folder: str, kind: str, state: dict[str, Any]) -> str:
        return (f"{self.base}/v1.0/me/mailFolders('{folder}')/messages/delta"
                f"?${kind}={self._token(state)}")

    async def delta(self, call: Call, folder: str) -> Reply:
        folder = folder.lower()
        with self.lock:
            box = self.mailbox(call.ctx["mailbox"])
            if folder not in box.folders:
                return Reply.graph_error(404, "ErrorItemNotFound", "Folder not found.")
            state_folder = box.folders[folder]
            q = call.query
            token = q.get("$skiptoken") or q.get("$deltatoken")
            if token:
                try:
                    state = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
                except ValueError:
                    return Reply.graph_error(400, "BadRequest", "Invalid token.")
                if state["epoch"] != state_folder.epoch or state["folder"] != folder:
                    return Reply.graph_error(
                        410, "SyncStateNotFound",
                        f"The sync state generation is not found; generation={state['end']};"
                        f"[highest={state_folder.seq}]",
                    )
                if "$deltatoken" in q:  # a new round starts where the last one ended
                    state = {**state, "after": state["end"], "pos": state["end"],
                             "end": state_folder.seq}
            else:
                since = None
                if "$filter" in q:
                    match = re.fullmatch(r"\s*receivedDateTime (ge|gt) (\S+)\s*", q["$filter"])
                    if match is None:
                        return Reply.graph_error(400, "ErrorInvalidUrlQueryFilter", "Only "
                                                 "receivedDateTime ge/gt is supported in delta.")
                    since = match.group(2)
                state = {"folder": folder, "epoch": state_folder.epoch, "after": None,
                         "pos": -1, "end": state_folder.seq, "since": since,
                         "select": q.get("$select")}
            size = min(int(call.ctx["prefer"].get("odata.maxpagesize", "10")), 1000)
            entries = self._window(box, state)
            page, rest = entries[:size], entries[size:]
            select = ({s.strip().lower() for s in state["select"].split(",")}
                      if state["select"] else None)
            value = []
            for _seq, msg, gone_id in page:
                if msg is None:
                    value.append({"@odata.type": "#microsoft.graph.message",
                                  "id": gone_id, "@removed": {"reason": "deleted"}})
                else:
                    value.append(self.message_json(call, msg, select=select))
            data: dict[str, Any] = {
                "@odata.context": f"{self.base}/v1.0/$metadata#Collection(message)",
                "value": value,
            }
            if rest:
                data["@odata.nextLink"] = self._link(folder, "skiptoken",
                                                     {**state, "pos": page[-1][0]})
            else:
                data["@odata.deltaLink"] = self._link(folder, "deltatoken", state)
            return Reply.json(200, data)

    def _window(self, box: FakeMailbox, state: dict[str, Any]
                ) -> list[tuple[int, FakeMessage | None, str]]:
        after, pos, end = state["after"], state["pos"], state["end"]
        since = datetime.fromisoformat(state["since"].replace("Z", "+00:00")) \
            if state["since"] else None
        low = max(pos, after if after is not None else -1)
        entries: list[tuple[int, FakeMessage | None, str]] = []
        for msg in box.in_folder(state["folder"]):
            if low < msg.seq <= end and (since is None or msg.received >= since):
                entries.append((msg.seq, msg, msg.id))
        if after is not None:
            present = {m.id for m in box.in_folder(state["folder"])}
            for tomb in box.folders[state["folder"]].tombstones:
                if low < tomb.seq <= end and tomb.id not in present:
                    entries.append((tomb.seq, None, tomb.id))
        return sorted(entries, key=lambda e: e[0])


def _selected(full: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
    if "$select" not in query:
        return full
    wanted = {s.strip().lower() for s in query["$select"].split(",")}
    return {k: v for k, v in full.items() if k.lower() in wanted or k == "id"}
