"""Graph change notifications: subscriptions per folder, and the answer to what
Graph posts to the notification endpoint.

Notifications only wake the connection; the delta query stays the source of
truth, so a lost, duplicated or forged notification costs at most one extra
delta request. Each subscription has its own random ``clientState`` (kept with
the connection's secrets); a notification whose ``clientState`` does not match
is ignored.

:class:`NotificationHub` is what the HTTP endpoint calls: the process has one,
:data:`HUB`, which the plugin serves at ``/notifications/outlook`` through the
HTTP API (the ``register_routes`` hook) and which Outlook connections of the
process subscribe through. ``hub.handle(body, query)`` answers the validation
handshake (echo ``validationToken`` as ``text/plain`` within 10 s) and
acknowledges notifications with ``202`` at once (Graph wants an answer within
3 s), after telling the subscribed provider. Lifecycle events are handled too:
``reauthorizationRequired`` renews the subscription, ``subscriptionRemoved``
creates a new one, and both, like ``missed``, trigger a delta pass.

:class:`Subscriptions` creates a subscription per folder and renews it before it
expires (Graph allows at most 4,230 minutes on messages). Each records the
notification and lifecycle URLs it was made with; when the configuration
names others, the subscription is deleted and made again, since Graph cannot
add or change a ``lifecycleNotificationUrl`` by ``PATCH``. Graph asks for no
more than ``Mail.ReadBasic`` to subscribe to messages; the connection's
``Mail.ReadWrite`` covers it.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote

from threadsync.core.errors import ProviderError
from threadsync.core.provider import Account
from threadsync.plugins.outlook.config import OutlookConfig
from threadsync.plugins.outlook.graph import GraphClient, GraphRequestError, json_object

log = logging.getLogger(__name__)

SUBSCRIBED_FOLDERS = ("inbox", "sentitems")
REAUTHORIZE = "reauthorizationRequired"
REMOVED = "subscriptionRemoved"
MISSED = "missed"


@dataclass(frozen=True)
class NotificationReply:
    """What the HTTP endpoint answers Graph."""

    status: int
    content_type: str = "text/plain"
    body: str = ""


class NotificationTarget(Protocol):
    """A live provider that subscribed; called for each valid notification."""

    def notified(self, subscription_id: str, lifecycle_event: str | None) -> None: ...


class NotificationHub:
    """Routes Graph's notifications to the providers that subscribed.

    One hub per process (:data:`HUB`), served at ``notification_url`` and
    ``lifecycle_url`` by the HTTP API; connections subscribe only while some
    endpoint serves it (:attr:`served`), since nobody would hear Graph otherwise.
    ``NotificationTarget.notified`` must be safe to call from the thread that runs
    :meth:`handle`.
    """

    def __init__(self) -> None:
        self._targets: dict[str, tuple[str, NotificationTarget]] = {}
        self._endpoints = 0

    @property
    def served(self) -> bool:
        """True while an HTTP endpoint of this process answers for the hub."""
        return self._endpoints > 0

    @contextmanager
    def serving(self) -> Iterator[NotificationHub]:
        """Mark the hub served for the duration of a ``with`` block."""
        self._endpoints += 1
        try:
            yield self
        finally:
            self._endpoints -= 1

    def serve_for_good(self) -> None:
        """Mark the hub served until the process ends (the HTTP API's route)."""
        self._endpoints += 1

    def register(self, subscription_id: str, client_state: str, target: NotificationTarget) -> None:
        self._targets[subscription_id] = (client_state, target)

    def unregister(self, subscription_id: str, target: NotificationTarget | None = None) -> None:
        """Forget a subscription (only if it still leads to ``target``, when given)."""
        known = self._targets.get(subscription_id)
        if known is not None and (target is None or known[1] is target):
            del self._targets[subscription_id]

    def __contains__(self, subscription_id: object) -> bool:
        return subscription_id in self._targets

    def handle(self, body: bytes, query: Mapping[str, str]) -> NotificationReply:
        """Answer one POST from Graph (notification or lifecycle endpoint)."""
        token = query.get("validationToken")
        if token is not None:
            return NotificationReply(200, "text/plain", token)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return NotificationReply(400, body="not JSON")
        items = data.get("value") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return NotificationReply(400, body="no value array")
        for item in items:
            if not isinstance(item, dict):
                continue
            known = self._targets.get(str(item.get("subscriptionId") or ""))
            if known is None:
                continue
            client_state, target = known
            if not hmac.compare_digest(client_state, str(item.get("clientState") or "")):
                log.warning("Graph notification with a wrong clientState ignored")
                continue
            event = item.get("lifecycleEvent")
            target.notified(str(item["subscriptionId"]), event if isinstance(event, str) else None)
        return NotificationReply(202)


#: The hub of this process.
HUB = NotificationHub()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Subscriptions:
    """The subscriptions of one connection: created, renewed, recreated, deleted.

    Their state lives in ``account.secrets["subscriptions"]`` (the client states
    are secrets); changes set ``account.secrets_changed``.
    """

    def __init__(
        self,
        graph: GraphClient,
        account: Account,
        config: OutlookConfig,
        hub: NotificationHub,
        target: NotificationTarget,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.graph = graph
        self.account = account
        self.config = config
        self.hub = hub
        self.target = target
        self.clock = clock
        self._flags: dict[str, str] = {}
        self.items: list[dict[str, Any]] = self._load()
        for item in self.items:
            hub.register(item["id"], item["client_state"], target)

    def _load(self) -> list[dict[str, Any]]:
        try:
            items = json.loads(self.account.secrets.get("subscriptions") or "[]")
        except ValueError:
            return []
        return [
            i for i in items
            if isinstance(i, dict) and all(isinstance(i.get(k), str)
                                           for k in ("id", "folder", "client_state", "expires"))
        ] if isinstance(items, list) else []

    def _save(self) -> None:
        self.account.secrets["subscriptions"] = json.dumps(self.items, sort_keys=True)
        self.account.secrets_changed = True

    def flag(self, subscription_id: str, event: str) -> None:
        """Remember a lifecycle event; :meth:`maintain` acts on it."""
        self._flags[subscription_id] = event

    @property
    def flagged(self) -> bool:
        return bool(self._flags)

    async def maintain(self) -> None:
        """Create missing subscriptions, renew those near expiry or flagged."""
        now = self.clock()
        renew_before = timedelta(minutes=self.config.renew_before_minutes)
        changed = False
        for folder in SUBSCRIBED_FOLDERS:
            item = next((i for i in self.items if i["folder"] == folder), None)
            flag = self._flags.pop(item["id"], None) if item else None
            if item is not None and flag == REMOVED:
                self._forget(item)
                item = None
            elif item is not None and not self._current(item):
                await self._delete(item)
                item = None
                changed = True
            if item is None:
                self.items.append(await self._create(folder))
                changed = True
                continue
            expires = _parse_time(item["expires"]) or now
            if flag == REAUTHORIZE or expires - now <= renew_before:
                changed = True
                try:
                    item["expires"] = await self._renew(item["id"])
                except GraphRequestError as exc:
                    if exc.status != 404:
                        raise
                    self._forget(item)
                    self.items.append(await self._create(folder))
        self._flags.clear()
        if changed:
            self._save()

    def _current(self, item: Mapping[str, Any]) -> bool:
        """Whether ``item`` was made with the URLs configured now."""
        return (item.get("notification_url") == self.config.notification_url
                and item.get("lifecycle_url") == self.config.lifecycle_url)

    async def _delete(self, item: dict[str, Any]) -> None:
        try:
            await self.graph.request("DELETE", f"subscriptions/{quote(item['id'], safe='')}")
        except GraphRequestError as exc:
            if exc.status != 404:
                raise
        self._forget(item)

    def detach(self) -> None:
        """Stop routing this connection's notifications here (the provider closes)."""
        for item in self.items:
            self.hub.unregister(item["id"], self.target)

    def _forget(self, item: dict[str, Any]) -> None:
        self.hub.unregister(item["id"])
        self.items.remove(item)

    def _expiry(self) -> str:
        return _iso(self.clock() + timedelta(minutes=self.config.subscription_minutes))

    async def _create(self, folder: str) -> dict[str, Any]:
        client_state = secrets.token_urlsafe(48)
        body: dict[str, Any] = {
            "changeType": "created",
            "notificationUrl": self.config.notification_url,
            "resource": f"{self.graph.root}/mailFolders('{folder}')/messages",
            "expirationDateTime": self._expiry(),
            "clientState": client_state,
            "latestSupportedTlsVersion": "v1_2",
        }
        if self.config.lifecycle_url:
            body["lifecycleNotificationUrl"] = self.config.lifecycle_url
        data = json_object(await self.graph.request("POST", "subscriptions", json=body))
        sub_id = data.get("id")
        if not isinstance(sub_id, str):
            raise GraphRequestError("Graph created a subscription without an id",
                                    status=201, code="")
        self.hub.register(sub_id, client_state, self.target)
        log.info("Graph subscription created", extra={"mailbox": self.account.email,
                                                        "folder": folder})
        return {
            "id": sub_id,
            "folder": folder,
            "client_state": client_state,
            "expires": str(data.get("expirationDateTime") or body["expirationDateTime"]),
            "notification_url": self.config.notification_url,
            "lifecycle_url": self.config.lifecycle_url,
        }

    async def _renew(self, subscription_id: str) -> str:
        expiry = self._expiry()
        data = json_object(
            await self.graph.request(
                "PATCH", f"subscriptions/{quote(subscription_id, safe='')}",
                json={"expirationDateTime": expiry},
            )
        )
        return str(data.get("expirationDateTime") or expiry)

    async def remove_all(self) -> None:
        """Delete every subscription (at disconnect); failures are only logged."""
        for item in list(self.items):
            try:
                await self.graph.request(
                    "DELETE", f"subscriptions/{quote(item['id'], safe='')}"
                )
            except ProviderError as exc:
                log.warning("could not delete a Graph subscription: %s", exc,
                            extra={"mailbox": self.account.email})
            self._forget(item)
        self._save()
