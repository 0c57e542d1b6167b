"""Push for Exchange: a pull subscription on Inbox and Sent Items.

Subscribe (``PullSubscriptionRequest``) once, then GetEvents at most every
``interval`` seconds while the connection waits; a CreatedEvent or NewMailEvent
wakes the pass. When the subscription is lost (``ErrorSubscriptionNotFound``
after a server restart or its timeout, any error really) the provider falls back
to polling and subscribes again at the next wait. Every call runs in the EWS
worker pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from exchangelib.folders import FolderCollection
from exchangelib.folders.base import BaseFolder
from exchangelib.services import GetEvents, SubscribeToPull, Unsubscribe

from threadsync.core.errors import ProviderError
from threadsync.plugins.exchange.ews import EwsSession

log = logging.getLogger(__name__)

#: Event types that mean "something arrived" in a watched folder.
EVENT_TYPES = ("NewMailEvent", "CreatedEvent")
#: Minutes Exchange keeps a pull subscription without a GetEvents call.
SUBSCRIPTION_MINUTES = 30


class PullEvents:
    """One pull subscription of one connection."""

    def __init__(self, session: EwsSession, folders: Sequence[BaseFolder], interval: float) -> None:
        self.session = session
        self.folders = list(folders)
        self.interval = max(interval, 0.05)
        self.subscription: tuple[str, str] | None = None
        self._next = 0.0

    async def changed(self) -> bool:
        """Whether events arrived since the last call; False while the next ask
        is not due yet or the subscription cannot be kept."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._next:
            return False
        self._next = loop.time() + self.interval
        try:
            if self.subscription is None:
                self.subscription = await self.session.call("subscribe", self._subscribe)
                return False
            sub_id, watermark = self.subscription
            found, watermark = await self.session.call(
                "events", lambda: self._events(sub_id, watermark))
            self.subscription = (sub_id, watermark)
            return found
        except ProviderError as exc:
            log.info("EWS pull subscription lost; polling", extra={
                "mailbox": self.session.email, "error": type(exc).__name__})
            self.subscription = None
            return False

    def _subscribe(self) -> tuple[str, str]:
        collection = FolderCollection(account=self.session.account, folders=self.folders)
        sub_id, watermark = SubscribeToPull(account=self.session.account).get(
            folders=collection.folders, event_types=EVENT_TYPES, watermark=None,
            timeout=SUBSCRIPTION_MINUTES)
        return str(sub_id), str(watermark)

    def _events(self, sub_id: str, watermark: str) -> tuple[bool, str]:
        found = False
        for notification in GetEvents(account=self.session.account).call(
                subscription_id=sub_id, watermark=watermark):
            if isinstance(notification, Exception):
                raise notification
            for event in notification.events or []:
                watermark = str(getattr(event, "watermark", None) or watermark)
                if type(event).__name__ in ("NewMailEvent", "CreatedEvent"):
                    found = True
        return found, watermark

    def rebind(self, session: EwsSession) -> None:
        """Use a new session (a refreshed token); the subscription is made again."""
        self.session = session
        self.folders = list(session.folders.values())
        self.subscription = None

    async def unsubscribe(self) -> None:
        sub, self.subscription = self.subscription, None
        if sub is not None:
            try:
                await self.session.call("unsubscribe", lambda: Unsubscribe(
                    account=self.session.account).get(subscription_id=sub[0]))
            except ProviderError:
                log.info("EWS unsubscribe failed", extra={"mailbox": self.session.email})

    def cancel(self) -> None:
        self.subscription = None


__all__ = ["PullEvents"]
