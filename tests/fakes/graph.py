"""A stateful fake of Microsoft Graph's mail API (v1.0), for one fake tenant.

The request pipeline does what Graph does before any handler runs: bearer-token
check against :class:`~tests.fakes.identity.FakeIdentity` (401
``InvalidAuthenticationToken``), ``/users/{id or userPrincipalName}/...`` for a
mailbox the signed-in user was given delegate rights to (403 ``ErrorAccessDenied``
otherwise; ``/me`` is the user's own), ``Prefer`` parsing (``IdType="ImmutableId"``
chooses immutable ids, ``odata.maxpagesize`` the page size; malformed values are
refused), the 4 MB request cap (413), injected throttling (429/503 with
``Retry-After``) and a log of every request, with the message whose body or
attachments it read.

Concurrency follows https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits
("four concurrent requests" per app and mailbox; ``concurrency_scope = "app"``
applies the other reading, per app across mailboxes): a request over the limit
gets 429 ``ApplicationThrottled`` (MailboxConcurrency) with ``Retry-After``.
``$batch`` follows https://learn.microsoft.com/graph/json-batching: at most 20
items, each evaluated against the limits on its own ("throttling" section), so
the items run side by side and every one holds a concurrency slot while it
runs: a 20-item batch gets 429 for the items over the limit while the others
succeed. Item responses keep their own headers, ``Content-Type`` included.

Reading is here (``/me``, folders, message lists with ``$filter=internetMessageId
eq``, ``$top`` and ``@odata.nextLink`` paging
(https://learn.microsoft.com/graph/paging), messages with ``$select`` (an unknown
property is a 400, as for the documented message resource) and
``$expand=singleValueExtendedProperties``, ``$value``), and delta per
https://learn.microsoft.com/graph/delta-query-messages and
https://learn.microsoft.com/graph/api/message-delta: ``@removed`` tombstones,
``410 Gone`` for a forgotten sync state, a filtered delta returns at most
``filtered_delta_cap`` (5,000) messages, ``$orderby=receivedDateTime desc`` is the
one order allowed (without it the order is not guaranteed: the fake lists in
change order); an item updated after the round it was listed in carries only
``id`` and the changed properties, and with ``replay`` on, every page repeats
the item the previous page ended with. Writing is in
:mod:`tests.fakes.graph_write`, subscriptions in :mod:`tests.fakes.subscriptions`.
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
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from tests.fakes.identity import FakeIdentity, Grant
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
        self.in_flight_app: Counter[str] = Counter()
        self.max_in_flight_app: Counter[str] = Counter()
        #: "mailbox": 4 concurrent requests per app and mailbox; "app": per app.
        self.concurrency_scope = "mailbox"
        #: mailbox -> users with delegate (full access and send-as) rights to it.
        self.delegates: dict[str, set[str]] = {}
        #: Most messages a delta with $filter returns in its first round.
        self.filtered_delta_cap = 5000
        #: Every delta page repeats the item the previous page ended with.
        self.replay = False
        #: Seconds between a 202 from /send and the message landing in Sent Items.
        self.sent_items_lag = 0.0
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

    def delegate(self, mailbox: str, user: str) -> None:
        """``user`` gets full access and send-as rights on ``mailbox``."""
        with self.lock:
            self.delegates.setdefault(mailbox.lower(), set()).add(user.lower())

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
        if call.path.lower() == "/$batch":
            return await self._batch(call, grant)
        target = self.resolve(call, grant)
        if isinstance(target, Reply):
            self._record(call, grant.user.email.lower(), target.status)
            return target
        return await self._limited(call, target, grant.client_id)

    def resolve(self, call: Call, grant: Grant) -> str | Reply:
        """The mailbox a request is for; ``/users/{x}/...`` becomes ``/me/...``."""
        own = grant.user.email.lower()
        call.ctx.update(grant=grant, root="/me")
        match = re.match(r"/users/([^/]+)(/.*)?\Z", call.path, re.IGNORECASE)
        if match is None:
            return own
        key = unquote(match.group(1)).lower()
        user = next((u for u in self.identity.users.values()
                     if key in (u.oid.lower(), u.upn.lower(), u.email.lower())), None)
        if user is None or user.email.lower() not in self.mailboxes:
            return Reply.graph_error(404, "ErrorInvalidUser", f"The requested user '{key}' "
                                     "is invalid.")
        mailbox = user.email.lower()
        if mailbox != own and (own not in self.delegates.get(mailbox, set())
                               or not _shared_scope(call, grant.scopes)):
            return Reply.graph_error(403, "ErrorAccessDenied",
                                     "Access is denied. Check credentials and try again.")
        call.ctx["root"] = "/users/" + match.group(1)
        call.path = "/me" + (match.group(2) or "")
        return mailbox

    async def _limited(self, call: Call, mailbox: str, app: str) -> Reply:
        """Serve ``call`` holding a concurrency slot of its mailbox (and app)."""
        with self.lock:
            self.in_flight[mailbox] += 1
            self.in_flight_app[app] += 1
            self.max_in_flight[mailbox] = max(self.max_in_flight[mailbox],
                                              self.in_flight[mailbox])
            self.max_in_flight_app[app] = max(self.max_in_flight_app[app],
                                              self.in_flight_app[app])
            count = (self.in_flight_app[app] if self.concurrency_scope == "app"
                     else self.in_flight[mailbox])
            busy = count > MAILBOX_CONCURRENCY
        try:
            if busy:
                self._record(call, mailbox, 429)
                return Reply.graph_error(429, "ApplicationThrottled",
                                         "Application is over its MailboxConcurrency limit.",
                                         **{"retry-after": "1"})
            # Always yield once: requests (and batch items) overlap as they would.
            await asyncio.sleep(self.latency)
            return await self.serve(call, mailbox)
        finally:
            with self.lock:
                self.in_flight[mailbox] -= 1
                self.in_flight_app[app] -= 1

    async def serve(self, call: Call, mailbox: str) -> Reply:
        """Everything after authentication and the concurrency check."""
        self.settle()
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
        unknown = _unknown_select(call)
        if unknown:
            self._record(call, mailbox, 400)
            return Reply.graph_error(400, "RequestBroker--ParseUri", f"Could not find a "
                                     f"property named '{unknown}' on type "
                                     "'Microsoft.OutlookServices.Message'.")
        reply = await self.router.dispatch(call)
        self._record(call, mailbox, reply.status)
        with self.lock:
            for rule in self.lost_answers:
                if rule.remaining > 0 and reply.status < 300 and rule.match(call):
                    rule.remaining -= 1
                    return Reply.graph_error(504, "GatewayTimeout", "The gateway timed out.")
        return reply

    def settle(self) -> None:
        """Sent messages whose Sent Items lag has passed land there now."""
        now = datetime.now(UTC)
        with self.lock:
            for box in self.mailboxes.values():
                for msg in list(box.messages.values()):
                    if msg.lands_at is not None and msg.lands_at <= now:
                        msg.lands_at = None
                        msg.is_draft = False
                        msg.sent = msg.received = now
                        box.move(msg, "sentitems")
                        self.on_created(box, msg)

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

    async def _batch(self, call: Call, grant: Grant) -> Reply:
        try:
            items = call.json()["requests"]
            assert isinstance(items, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            return Reply.graph_error(400, "BadRequest", "Invalid batch payload.")
        if len(items) > 20:
            return Reply.graph_error(400, "BadRequest",
                                     "Number of batch requests exceeds the limit of 20.")
        self._record(call, grant.user.email.lower(), 200)

        async def run(item: dict[str, Any]) -> Reply:
            url = urlsplit(str(item.get("url", "")))
            path = url.path if url.path.startswith("/") else "/" + url.path
            if url.netloc and f"{url.scheme}://{url.netloc}" == self.base:
                # Microsoft's SDK sends the absolute URL of the item.
                path = path.removeprefix("/v1.0")
            headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
            body = item.get("body")
            sub = Call(
                method=str(item.get("method", "GET")).upper(),
                path=normalise(unquote(path)),
                query=dict(parse_qsl(url.query, keep_blank_values=True)),
                headers=headers,
                body=json.dumps(body).encode() if body is not None else b"",
                header_lists={k: [v] for k, v in headers.items()},
                in_batch=True,
            )
            if sub.path.lower().startswith("/v1.0/"):
                return Reply.graph_error(400, "BadRequest", "Batch URLs are relative to v1.0.")
            target = self.resolve(sub, grant)
            if isinstance(target, Reply):
                return target
            return await self._limited(sub, target, grant.client_id)

        replies = await asyncio.gather(*(run(item) for item in items))
        answers = []
        for item, reply in zip(items, replies, strict=True):
            json_body = reply.headers.get("content-type", "").startswith("application/json")
            answers.append({
                "id": item.get("id"),
                "status": reply.status,
                "headers": dict(reply.headers),
                "body": reply.data() if json_body else (
                    base64.b64encode(reply.body).decode() if reply.body else None),
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
            top = min(int(call.query.get("$top", "10")), 1000)
            skip = int(call.query.get("$skip", "0"))
            data: dict[str, Any] = {
                "@odata.context": f"{self.base}/v1.0/$metadata#users('{call.ctx['mailbox']}')"
                                  f"/mailFolders('{folder}')/messages",
                "value": [self.message_json(call, m) for m in messages[skip:skip + top]],
            }
            if len(messages) > skip + top:
                query = {**call.query, "$top": str(top), "$skip": str(skip + top)}
                data["@odata.nextLink"] = (f"{self.base}/v1.0{call.ctx.get('root', '/me')}"
                                           f"/mailFolders('{folder}')/messages?"
                                           f"{urlencode(query)}")
            return Reply.json(200, data)

    # ---- delta ----------------------------------------------------------------------------

    def _token(self, state: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")

    def _link(self, call: Call, folder: str, kind: str, state: dict[str, Any]) -> str:
        return (f"{self.base}/v1.0{call.ctx.get('root', '/me')}/mailFolders('{folder}')"
                f"/messages/delta?${kind}={self._token(state)}")

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
                order = q.get("$orderby")
                if order is not None and " ".join(order.split()).lower() != (
                        "receiveddatetime desc"):
                    return Reply.graph_error(400, "ErrorInvalidUrlQuery", "Only $orderby="
                                             "receivedDateTime desc is supported in delta.")
                state = {"folder": folder, "epoch": state_folder.epoch, "after": None,
                         "pos": -1, "offset": 0, "end": state_folder.seq, "since": since,
                         "desc": order is not None, "select": q.get("$select")}
            size = min(int(call.ctx["prefer"].get("odata.maxpagesize", "10")), 1000)
            entries = self._window(box, state)
            page, rest = entries[:size], entries[size:]
            select = ({s.strip().lower() for s in state["select"].split(",")}
                      if state["select"] else None)
            value = []
            if self.replay and state["after"] is not None:
                again = next((m for m in box.in_folder(folder) if m.seq == state["pos"]), None)
                if again is not None:
                    value.append(self.message_json(call, again, select=select))
            for _seq, msg, gone_id in page:
                if msg is None:
                    value.append({"@odata.type": "#microsoft.graph.message",
                                  "id": gone_id, "@removed": {"reason": "deleted"}})
                elif state["after"] is not None and msg.created_seq <= state["after"]:
                    value.append(self._partial(call, msg, select))
                else:
                    value.append(self.message_json(call, msg, select=select))
            data: dict[str, Any] = {
                "@odata.context": f"{self.base}/v1.0/$metadata#Collection(message)",
                "value": value,
            }
            if rest:
                following = ({**state, "offset": state["offset"] + len(page)}
                             if state["after"] is None else {**state, "pos": page[-1][0]})
                data["@odata.nextLink"] = self._link(call, folder, "skiptoken", following)
            else:
                data["@odata.deltaLink"] = self._link(call, folder, "deltatoken", state)
            return Reply.json(200, data)

    def _partial(self, call: Call, msg: FakeMessage, select: set[str] | None) -> dict[str, Any]:
        """An update of a message listed in an earlier round: id and what changed."""
        full = msg.json(None, call.ctx["mailbox"], call.ctx["immutable"])
        wanted = {c.lower() for c in msg.changed}
        if select is not None:
            wanted &= select
        return {"@odata.type": "#microsoft.graph.message", "@odata.etag": full["@odata.etag"],
                "id": full["id"], **{k: v for k, v in full.items() if k.lower() in wanted}}

    def _window(self, box: FakeMailbox, state: dict[str, Any]
                ) -> list[tuple[int, FakeMessage | None, str]]:
        after, pos, end = state["after"], state["pos"], state["end"]
        since = datetime.fromisoformat(state["since"].replace("Z", "+00:00")) \
            if state["since"] else None
        if after is None:
            # The first round lists what the folder held when it began (at most
            # the cap when filtered), in the order asked for, by position.
            held = [m for m in box.in_folder(state["folder"])
                    if m.created_seq <= end and (since is None or m.received >= since)]
            if state.get("desc"):
                held.sort(key=lambda m: (m.received, m.seq), reverse=True)
            if since is not None:
                held = held[:self.filtered_delta_cap]
            return [(m.seq, m, m.id) for m in held][state.get("offset", 0):]
        low = max(pos, after)
        entries: list[tuple[int, FakeMessage | None, str]] = []
        for msg in box.in_folder(state["folder"]):
            if low < msg.seq <= end and (since is None or msg.received >= since):
                entries.append((msg.seq, msg, msg.id))
        present = {m.id for m in box.in_folder(state["folder"])}
        for tomb in box.folders[state["folder"]].tombstones:
            if low < tomb.seq <= end and tomb.id not in present:
                entries.append((tomb.seq, None, tomb.id))
        return sorted(entries, key=lambda e: e[0])


def _shared_scope(call: Call, scopes: tuple[str, ...]) -> bool:
    """Another user's mailbox needs the ``.Shared`` permissions
    (https://learn.microsoft.com/graph/outlook-share-messages-folders)."""
    have = {s.rsplit("/", 1)[-1].lower() for s in scopes}
    if call.path.lower().endswith(("/send", "/sendmail")):
        return "mail.send.shared" in have
    if call.method == "GET":
        return bool(have & {"mail.read.shared", "mail.readwrite.shared"})
    return "mail.readwrite.shared" in have


#: Properties of the message resource
#: (https://learn.microsoft.com/graph/api/resources/message#properties).
MESSAGE_PROPERTIES = frozenset(p.lower() for p in (
    "bccRecipients", "body", "bodyPreview", "categories", "ccRecipients", "changeKey",
    "conversationId", "conversationIndex", "createdDateTime", "flag", "from",
    "hasAttachments", "id", "importance", "inferenceClassification",
    "internetMessageHeaders", "internetMessageId", "isDeliveryReceiptRequested", "isDraft",
    "isRead", "isReadReceiptRequested", "lastModifiedDateTime", "parentFolderId",
    "receivedDateTime", "replyTo", "sender", "sentDateTime", "subject", "toRecipients",
    "uniqueBody", "webLink",
))


def _unknown_select(call: Call) -> str | None:
    """The first ``$select`` name a message request names that messages lack."""
    if "$select" not in call.query or "/messages" not in call.path.lower():
        return None
    for name in call.query["$select"].split(","):
        if name.strip().lower() not in MESSAGE_PROPERTIES:
            return name.strip()
    return None


def _selected(full: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
    if "$select" not in query:
        return full
    wanted = {s.strip().lower() for s in query["$select"].split(",")}
    return {k: v for k, v in full.items() if k.lower() in wanted or k == "id"}
