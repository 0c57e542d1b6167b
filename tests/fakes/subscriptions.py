"""Change-notification subscriptions of the fake Graph.

``POST /subscriptions`` validates its ``notificationUrl`` (and
``lifecycleNotificationUrl``) the way Graph does: it POSTs
``?validationToken=...`` there and wants the token back as ``text/plain`` with
200 within 10 s. The expiry may be at most 4,230 minutes ahead; ``clientState``
at most 128 characters. When a message is created in a subscribed folder, a
notification (``changeType: created``, ``resourceData.id``, ``clientState``) is
POSTed to the endpoint; :meth:`FakeSubscriptions.lifecycle` sends lifecycle
events (``reauthorizationRequired``, ``subscriptionRemoved``, ``missed``).

Per https://learn.microsoft.com/graph/api/subscription-post-subscriptions a
subscription on messages needs ``Mail.ReadBasic`` at least (``Mail.Read`` and
``Mail.ReadWrite`` are the higher ones; their ``.Shared`` forms for another
user's mailbox, ``users/{id}/...``); without one it is a 403. ``GET
/subscriptions`` lists the caller's subscriptions and ``GET
/subscriptions/{id}`` reads one (subscription-list, subscription-get);
``POST /subscriptions/{id}/reauthorize`` answers 204 (subscription-reauthorize).
``PATCH`` changes ``expirationDateTime`` and ``notificationUrl`` only
(subscription-update): ``lifecycleNotificationUrl`` cannot be added or changed
that way (https://learn.microsoft.com/graph/change-notifications-lifecycle-events:
"You can't add or update the lifecycleNotificationUrl ... using a PATCH";
recreate the subscription instead).
"""

from __future__ import annotations

import re
import secrets
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.fakes.graph import ID, FakeGraph
from tests.fakes.mailstore import FakeMailbox, FakeMessage
from tests.fakes.server import Call, Reply

MAX_MINUTES = 4230


@dataclass
class FakeSubscription:
    id: str
    mailbox: str
    folder: str
    change_types: set[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str
    expires: datetime
    creator: str = ""
    resource: str = ""

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resource": self.resource or f"me/mailFolders('{self.folder}')/messages",
            "applicationId": "00000000-0000-0000-0000-000000000000",
            "changeType": ",".join(sorted(self.change_types)),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": self.expires.strftime("%Y-%m-%dT%H:%M:%S.0000000Z"),
            "latestSupportedTlsVersion": "v1_2",
        }


def _when(value: Any) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class FakeSubscriptions:
    """Registers ``/subscriptions`` on a :class:`FakeGraph` and sends notifications."""

    def __init__(self, graph: FakeGraph, tls: ssl.SSLContext,
                 submit: Any) -> None:
        self.g = graph
        self.tls = tls
        self.submit = submit
        self.items: dict[str, FakeSubscription] = {}
        self.delivered: list[dict[str, Any]] = []
        self.reauthorized: list[str] = []
        r = graph.router
        r.add("POST", r"/subscriptions", self.create)
        r.add("PATCH", r"/subscriptions/" + ID, self.renew)
        r.add("DELETE", r"/subscriptions/" + ID, self.delete)
        r.add("GET", r"/subscriptions", self.list)
        r.add("GET", r"/subscriptions/" + ID, self.get)
        r.add("POST", r"/subscriptions/" + ID + r"/reauthorize", self.reauthorize)
        graph.on_created = self.created

    async def _validate(self, url: str) -> bool:
        token = secrets.token_urlsafe(24)
        try:
            async with httpx.AsyncClient(verify=self.tls, timeout=10) as client:
                response = await client.post(url, params={"validationToken": token},
                                             headers={"content-type": "text/plain"})
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.text == token

    async def create(self, call: Call) -> Reply:
        data = call.json() or {}
        url = str(data.get("notificationUrl") or "")
        lifecycle = data.get("lifecycleNotificationUrl")
        expires = _when(data.get("expirationDateTime"))
        now = datetime.now(UTC)
        resource = str(data.get("resource") or "")
        match = re.fullmatch(r"/?(me|users/[^/]+)/mailFolders(?:\('|/)(\w+)(?:'\))?/messages",
                             resource, re.IGNORECASE)
        if not url.startswith("https://") or match is None or not data.get("changeType"):
            return Reply.graph_error(400, "InvalidRequest", "notificationUrl must be https; "
                                     "resource and changeType are required.")
        have = {s.rsplit("/", 1)[-1].lower() for s in call.ctx["grant"].scopes}
        if not have & {"mail.readbasic", "mail.read", "mail.readwrite", "mail.readbasic.shared",
                       "mail.read.shared", "mail.readwrite.shared"}:
            return Reply.graph_error(403, "ExtensionError", "Operation: Create; Exception: "
                                     "[Status Code: Forbidden; Reason: Access is denied.]")
        owner = Call("GET", "/" + match.group(1), {}, {})
        mailbox = self.g.resolve(owner, call.ctx["grant"])
        if isinstance(mailbox, Reply):
            return mailbox
        if expires is None or expires <= now or expires > now + timedelta(minutes=MAX_MINUTES):
            return Reply.graph_error(400, "InvalidRequest", "Subscription expiration can only "
                                     f"be {MAX_MINUTES} minutes in the future.")
        if len(str(data.get("clientState") or "")) > 128:
            return Reply.graph_error(400, "InvalidRequest", "clientState is too long.")
        for target in (url, lifecycle):
            if target and not await self._validate(str(target)):
                return Reply.graph_error(400, "InvalidRequest", "Subscription validation "
                                         "request failed. Response must exactly match "
                                         "validationToken query parameter.")
        sub = FakeSubscription(
            id=secrets.token_hex(16), mailbox=mailbox,
            folder=match.group(2).lower(),
            change_types={c.strip() for c in str(data["changeType"]).split(",")},
            notification_url=url, lifecycle_url=str(lifecycle) if lifecycle else None,
            client_state=str(data.get("clientState") or ""), expires=expires,
            creator=call.ctx["mailbox"], resource=resource,
        )
        with self.g.lock:
            self.items[sub.id] = sub
        return Reply.json(201, sub.json())

    def _own(self, call: Call, sub_id: str) -> FakeSubscription | Reply:
        sub = self.items.get(sub_id)
        if sub is None or sub.creator != call.ctx["mailbox"]:
            return Reply.graph_error(404, "ResourceNotFound", "Subscription not found.")
        return sub

    async def renew(self, call: Call, sub_id: str) -> Reply:
        with self.g.lock:
            sub = self._own(call, sub_id)
            if isinstance(sub, Reply):
                return sub
            data = call.json() or {}
            if any(k.lower() == "lifecyclenotificationurl" for k in data):
                return Reply.graph_error(400, "InvalidRequest", "lifecycleNotificationUrl "
                                         "cannot be added or updated; recreate the "
                                         "subscription.")
            expires = _when(data.get("expirationDateTime", sub.expires.isoformat()))
            now = datetime.now(UTC)
            if expires is None or expires > now + timedelta(minutes=MAX_MINUTES):
                return Reply.graph_error(400, "InvalidRequest", "Bad expirationDateTime.")
            url = data.get("notificationUrl")
        if url is not None and (not str(url).startswith("https://")
                                or not await self._validate(str(url))):
            return Reply.graph_error(400, "InvalidRequest", "Subscription validation request "
                                     "failed.")
        with self.g.lock:
            sub.expires = expires
            if url is not None:
                sub.notification_url = str(url)
            return Reply.json(200, sub.json())

    async def delete(self, call: Call, sub_id: str) -> Reply:
        with self.g.lock:
            sub = self._own(call, sub_id)
            if isinstance(sub, Reply):
                return sub
            del self.items[sub_id]
        return Reply(204)

    async def get(self, call: Call, sub_id: str) -> Reply:
        with self.g.lock:
            sub = self._own(call, sub_id)
            if isinstance(sub, Reply):
                return sub
            return Reply.json(200, {"@odata.context": f"{self.g.base}/v1.0/$metadata#"
                                    "subscriptions/$entity", **sub.json()})

    async def list(self, call: Call) -> Reply:
        with self.g.lock:
            mine = [s.json() for s in self.items.values() if s.creator == call.ctx["mailbox"]]
        return Reply.json(200, {"@odata.context": f"{self.g.base}/v1.0/$metadata#subscriptions",
                                "value": mine})

    async def reauthorize(self, call: Call, sub_id: str) -> Reply:
        with self.g.lock:
            sub = self._own(call, sub_id)
            if isinstance(sub, Reply):
                return sub
            self.reauthorized.append(sub_id)
        return Reply(204)

    # ---- notifications ---------------------------------------------------------------------

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        try:
            async with httpx.AsyncClient(verify=self.tls, timeout=10) as client:
                response = await client.post(url, json=body)
            self.delivered.append({"url": url, "status": response.status_code, "body": body})
        except httpx.HTTPError:
            self.delivered.append({"url": url, "status": 0, "body": body})

    def created(self, box: FakeMailbox, msg: FakeMessage) -> None:
        now = datetime.now(UTC)
        for sub in list(self.items.values()):
            if sub.mailbox != box.owner.lower() or sub.folder != msg.folder:
                continue
            if "created" not in sub.change_types or sub.expires < now:
                continue
            user = self.g.identity.user(box.owner)
            resource = f"Users/{user.oid}/Messages/{msg.id}"
            body = {"value": [{
                "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": sub.json()["expirationDateTime"],
                "changeType": "created",
                "resource": resource,
                "resourceData": {"@odata.type": "#Microsoft.Graph.Message",
                                 "@odata.id": resource, "@odata.etag": 'W/"CQAAAA=="',
                                 "id": msg.id},
                "clientState": sub.client_state,
                "tenantId": user.tid,
            }]}
            self.submit(lambda url=sub.notification_url, body=body: self._post(url, body))

    def lifecycle(self, sub_id: str, event: str) -> None:
        """Graph sends a lifecycle event (``subscriptionRemoved`` also drops it)."""
        with self.g.lock:
            sub = self.items[sub_id]
            if event == "subscriptionRemoved":
                del self.items[sub_id]
        body = {"value": [{
            "lifecycleEvent": event, "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": sub.json()["expirationDateTime"],
            "clientState": sub.client_state,
            "tenantId": self.g.identity.tenant_id,
        }]}
        self.submit(lambda: self._post(sub.lifecycle_url or sub.notification_url, body))
